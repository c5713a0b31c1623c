//! Checks of a validated config that need a connector's own parser, so
//! that `weft validate` refuses what `weft run` would refuse when it builds
//! the connectors (a PostgreSQL or MariaDB URL the client cannot parse, a
//! webhook path or header name the HTTP server cannot mount).
//! Pure: nothing connects. Messages never quote a URL (it may hold a
//! password).

use weft_core::config::{Config, Issue, SinkSpec, SourceSpec};

/// Every problem the connectors' parsers find in `config`, by document
/// path (the loader adds the line and column).
pub fn check(config: &Config) -> Vec<Issue> {
    let mut issues = Vec::new();
    for (name, sys) in &config.systems {
        match &sys.sink {
            Some(SinkSpec::Postgres { cfg }) => postgres_url(
                &mut issues,
                &format!("systems.{name}.sink.postgres.url"),
                cfg.url.expose(),
            ),
            Some(SinkSpec::Mysql { cfg }) => mysql_url(
                &mut issues,
                &format!("systems.{name}.sink.mysql.url"),
                cfg.url.expose(),
            ),
            _ => {}
        }
        if let Some(spec @ SourceSpec::Webhook { .. }) = &sys.source
            && let Err(e) = crate::webhook::WebhookRoute::new(name, spec)
        {
            // the route `weft run` mounts: its path and header names
            issue(
                &mut issues,
                &format!("systems.{name}.source.webhook"),
                e.message,
            );
        }
        #[cfg(feature = "cdc-postgres")]
        if let Some(SourceSpec::PostgresCdc { settings }) = &sys.source
            && let Err(found) = crate::cdc::postgres::PgCdcConfig::from_settings(name, settings)
        {
            issues.extend(found);
        }
        #[cfg(not(feature = "cdc-postgres"))]
        if let Some(SourceSpec::PostgresCdc { .. }) = &sys.source {
            issue(
                &mut issues,
                &format!("systems.{name}.source.postgres_cdc"),
                crate::without_feature("cdc-postgres", "PostgreSQL change data capture"),
            );
        }
        #[cfg(feature = "cdc-mysql")]
        if let Some(SourceSpec::MysqlCdc { settings }) = &sys.source
            && let Err(found) = crate::cdc::mysql::MyCdcConfig::from_settings(name, settings)
        {
            issues.extend(found);
        }
        #[cfg(not(feature = "cdc-mysql"))]
        if let Some(SourceSpec::MysqlCdc { .. }) = &sys.source {
            issue(
                &mut issues,
                &format!("systems.{name}.source.mysql_cdc"),
                crate::without_feature("cdc-mysql", "MariaDB/MySQL change data capture"),
            );
        }
        #[cfg(feature = "nats")]
        {
            use crate::broker::nats;
            if let Some(SourceSpec::Nats { settings }) = &sys.source
                && let Err(found) = nats::NatsSourceConfig::from_settings(name, settings)
            {
                issues.extend(found);
            }
            if let Some(SinkSpec::Nats { settings }) = &sys.sink
                && let Err(found) = nats::NatsSinkConfig::from_settings(name, settings)
            {
                issues.extend(found);
            }
        }
        #[cfg(not(feature = "nats"))]
        {
            if let Some(SourceSpec::Nats { .. }) = &sys.source {
                issue(
                    &mut issues,
                    &format!("systems.{name}.source.nats"),
                    crate::without_feature("nats", "NATS JetStream"),
                );
            }
            if let Some(SinkSpec::Nats { .. }) = &sys.sink {
                issue(
                    &mut issues,
                    &format!("systems.{name}.sink.nats"),
                    crate::without_feature("nats", "NATS JetStream"),
                );
            }
        }
        #[cfg(feature = "amqp")]
        {
            use crate::broker::amqp;
            if let Some(SourceSpec::Amqp { settings }) = &sys.source
                && let Err(found) = amqp::AmqpSourceConfig::from_settings(name, settings)
            {
                issues.extend(found);
            }
            if let Some(SinkSpec::Amqp { settings }) = &sys.sink
                && let Err(found) = amqp::AmqpSinkConfig::from_settings(name, settings)
            {
                issues.extend(found);
            }
        }
        #[cfg(not(feature = "amqp"))]
        {
            if let Some(SourceSpec::Amqp { .. }) = &sys.source {
                issue(
                    &mut issues,
                    &format!("systems.{name}.source.amqp"),
                    crate::without_feature("amqp", "RabbitMQ (AMQP)"),
                );
            }
            if let Some(SinkSpec::Amqp { .. }) = &sys.sink {
                issue(
                    &mut issues,
                    &format!("systems.{name}.sink.amqp"),
                    crate::without_feature("amqp", "RabbitMQ (AMQP)"),
                );
            }
        }
        #[cfg(feature = "redis")]
        {
            use crate::broker::redis;
            if let Some(SourceSpec::Redis { settings }) = &sys.source
                && let Err(found) = redis::RedisSourceConfig::from_settings(name, settings)
            {
                issues.extend(found);
            }
            if let Some(SinkSpec::Redis { settings }) = &sys.sink
                && let Err(found) = redis::RedisSinkConfig::from_settings(name, settings)
            {
                issues.extend(found);
            }
        }
        #[cfg(not(feature = "redis"))]
        {
            if let Some(SourceSpec::Redis { .. }) = &sys.source {
                issue(
                    &mut issues,
                    &format!("systems.{name}.source.redis"),
                    crate::without_feature("redis", "Redis Streams"),
                );
            }
            if let Some(SinkSpec::Redis { .. }) = &sys.sink {
                issue(
                    &mut issues,
                    &format!("systems.{name}.sink.redis"),
                    crate::without_feature("redis", "Redis Streams"),
                );
            }
        }
        #[cfg(feature = "mqtt")]
        {
            use crate::broker::mqtt;
            if let Some(SourceSpec::Mqtt { settings }) = &sys.source
                && let Err(found) = mqtt::MqttSourceConfig::from_settings(name, settings)
            {
                issues.extend(found);
            }
            if let Some(SinkSpec::Mqtt { settings }) = &sys.sink
                && let Err(found) = mqtt::MqttSinkConfig::from_settings(name, settings)
            {
                issues.extend(found);
            }
        }
        #[cfg(not(feature = "mqtt"))]
        {
            if let Some(SourceSpec::Mqtt { .. }) = &sys.source {
                issue(
                    &mut issues,
                    &format!("systems.{name}.source.mqtt"),
                    crate::without_feature("mqtt", "MQTT"),
                );
            }
            if let Some(SinkSpec::Mqtt { .. }) = &sys.sink {
                issue(
                    &mut issues,
                    &format!("systems.{name}.sink.mqtt"),
                    crate::without_feature("mqtt", "MQTT"),
                );
            }
        }
        #[cfg(feature = "kafka")]
        {
            use crate::broker::kafka;
            if let Some(SourceSpec::Kafka { settings }) = &sys.source
                && let Err(found) = kafka::KafkaSourceConfig::from_settings(name, settings)
            {
                issues.extend(found);
            }
            if let Some(SinkSpec::Kafka { settings }) = &sys.sink
                && let Err(found) = kafka::KafkaSinkConfig::from_settings(name, settings)
            {
                issues.extend(found);
            }
        }
        #[cfg(not(feature = "kafka"))]
        {
            if let Some(SourceSpec::Kafka { .. }) = &sys.source {
                issue(
                    &mut issues,
                    &format!("systems.{name}.source.kafka"),
                    crate::without_feature("kafka", "Kafka"),
                );
            }
            if let Some(SinkSpec::Kafka { .. }) = &sys.sink {
                issue(
                    &mut issues,
                    &format!("systems.{name}.sink.kafka"),
                    crate::without_feature("kafka", "Kafka"),
                );
            }
        }
        if let Some(SourceSpec::SqlPoll { cfg, .. }) = &sys.source {
            let path = format!("systems.{name}.source.sql_poll.url");
            let url = cfg.url.expose().trim();
            if url.starts_with("postgres") {
                postgres_url(&mut issues, &path, url);
            } else if url.starts_with("mysql:") {
                mysql_url(&mut issues, &path, url);
            }
        }
    }
    issues
}

fn issue(issues: &mut Vec<Issue>, path: &str, message: String) {
    issues.push(Issue {
        path: path.to_owned(),
        line: None,
        column: None,
        message,
    });
}

fn postgres_url(issues: &mut Vec<Issue>, path: &str, url: &str) {
    #[cfg(not(feature = "postgres"))]
    {
        let _ = url;
        issue(
            issues,
            path,
            crate::without_feature("postgres", "PostgreSQL"),
        );
    }
    // the parser `tokio_postgres::connect` uses
    #[cfg(feature = "postgres")]
    let url = match crate::pg_tls::connector(url) {
        Ok(t) => t.url,
        Err(e) => {
            issue(issues, path, e);
            return;
        }
    };
    #[cfg(feature = "postgres")]
    if let Err(e) = url.parse::<tokio_postgres::Config>() {
        issue(
            issues,
            path,
            format!("not a PostgreSQL connection URL the client accepts: {e}"),
        );
    }
}

fn mysql_url(issues: &mut Vec<Issue>, path: &str, url: &str) {
    #[cfg(not(feature = "mysql"))]
    {
        let _ = url;
        issue(
            issues,
            path,
            crate::without_feature("mysql", "MariaDB/MySQL"),
        );
    }
    #[cfg(feature = "mysql")]
    if let Err(e) = mysql_async::Opts::from_url(url) {
        issue(
            issues,
            path,
            format!("not a MariaDB/MySQL connection URL the client accepts: {e}"),
        );
    }
}
