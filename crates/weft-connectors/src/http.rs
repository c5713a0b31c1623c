//! TODO(helper): the http sink.

use futures::future::BoxFuture;

use crate::sink::{Delivery, Sink, SinkError};

pub struct HttpSink;

impl HttpSink {
    pub fn new(
        _cfg: &weft_core::config::raw::HttpSinkConfig,
        _method: &str,
        _timeout: std::time::Duration,
        _connect_timeout: std::time::Duration,
    ) -> Result<Self, String> {
        Err("not built yet".into())
    }
}

impl Sink for HttpSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            crate::sink::all_failed(batch.len(), || SinkError::permanent("not built yet"))
        })
    }
}
