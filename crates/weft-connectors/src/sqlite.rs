//! TODO(helper): the sqlite sink.

use futures::future::BoxFuture;

use crate::sink::{Delivery, Sink, SinkError};

pub struct SqliteSink;

impl SqliteSink {
    pub fn open(
        _cfg: &weft_core::config::raw::SqliteSinkConfig,
        _path: &std::path::Path,
    ) -> Result<Self, String> {
        Err("not built yet".into())
    }
}

impl Sink for SqliteSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            crate::sink::all_failed(batch.len(), || SinkError::permanent("not built yet"))
        })
    }
}
