//! TODO(helper): the PostgreSQL upsert sink.

use futures::future::BoxFuture;

use crate::sink::{Delivery, Sink, SinkError};

pub struct PostgresSink;

impl PostgresSink {
    pub async fn connect(
        _cfg: &weft_core::config::raw::PostgresSinkConfig,
    ) -> Result<Self, String> {
        Err("not built yet".into())
    }
}

impl Sink for PostgresSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            crate::sink::all_failed(batch.len(), || SinkError::permanent("not built yet"))
        })
    }
}
