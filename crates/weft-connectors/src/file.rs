//! TODO(helper): the file source (drop folder or one file; CSV, JSON Lines).

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use weft_core::config::SourceSpec;

use crate::source::{Ingest, Source, SourceError};

pub struct FileSource;

impl FileSource {
    pub fn new(system: &str, _spec: &SourceSpec) -> Result<Self, SourceError> {
        Err(SourceError {
            system: system.into(),
            message: "not built yet".into(),
        })
    }
}

impl Source for FileSource {
    fn run(
        self: Box<Self>,
        _ingest: Arc<dyn Ingest>,
        _shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async { Ok(()) })
    }
}
