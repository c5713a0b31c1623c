//! Versioned migrations, applied in order on open; `PRAGMA user_version`
//! records the last applied one. A migration is never edited once released:
//! add a new one.

use rusqlite::Connection;

use crate::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: the initial schema
    r#"
    -- Every accepted event, once per (source, event_id): the dedupe key.
    CREATE TABLE inbox (
        seq            INTEGER PRIMARY KEY,
        source         TEXT NOT NULL,
        event_id       TEXT NOT NULL,
        received_at    INTEGER NOT NULL,      -- ms since the epoch
        correlation_id TEXT NOT NULL,
        attributes     TEXT NOT NULL,         -- CloudEvents attributes, JSON
        payload        TEXT NOT NULL,         -- the record as received, JSON (or raw text if bad)
        UNIQUE (source, event_id)
    );
    -- Work to deliver: one row per event, flow and destination. AUTOINCREMENT:
    -- ids are never reused once the table empties, so "id order" is
    -- acceptance order and delivery lanes can read `id > last seen`.
    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        flow            TEXT NOT NULL,
        destination     TEXT NOT NULL,
        entity_key      TEXT,
        idempotency_key TEXT NOT NULL,
        source          TEXT NOT NULL,
        event_id        TEXT NOT NULL,
        correlation_id  TEXT NOT NULL,
        created_at      INTEGER NOT NULL,     -- when the event was accepted, ms
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_at         INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT,
        order_seq       INTEGER,              -- position in its key's order; NULL = id (a replay keeps the original)
        payload         TEXT NOT NULL         -- mapped payload, JSON
    );
    CREATE INDEX outbox_by_lane ON outbox (flow, destination, id);
    -- Dead letters: what could not be mapped or delivered, with why.
    CREATE TABLE dlq (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        status          TEXT NOT NULL DEFAULT 'dead',  -- dead | replayed | discarded
        stage           TEXT NOT NULL,                 -- parse | map | deliver
        flow            TEXT NOT NULL,
        destination     TEXT NOT NULL DEFAULT '',      -- '' for parse/map failures
        entity_key      TEXT,
        idempotency_key TEXT,
        source          TEXT NOT NULL,
        event_id        TEXT NOT NULL,
        correlation_id  TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        failed_at       INTEGER NOT NULL,
        attempts        INTEGER NOT NULL,
        error           TEXT NOT NULL,
        payload         TEXT NOT NULL,
        history         TEXT NOT NULL DEFAULT '[]',    -- JSON array of {at, action, ...}
        order_seq       INTEGER                        -- the outbox order it had, kept for replay
    );
    CREATE INDEX dlq_by_status ON dlq (status, flow, destination, id);
    -- Source positions, saved in the same transaction as the records before them.
    CREATE TABLE checkpoints (
        source     TEXT NOT NULL,
        key        TEXT NOT NULL,
        value      TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (source, key)
    );
    -- Record accounting, kept in the same transactions as the state changes.
    -- destination '' holds the flow-level counts (received, filtered, rejected,
    -- discarded rejects); a destination's row holds its delivery outcomes.
    CREATE TABLE flow_counts (
        flow          TEXT NOT NULL,
        destination   TEXT NOT NULL,
        received      INTEGER NOT NULL DEFAULT 0,
        filtered      INTEGER NOT NULL DEFAULT 0,
        rejected      INTEGER NOT NULL DEFAULT 0,
        delivered     INTEGER NOT NULL DEFAULT 0,
        dead_lettered INTEGER NOT NULL DEFAULT 0,
        discarded     INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (flow, destination)
    );
    "#,
    // 2: drift detection
    r#"
    -- The observed shape of each source stream (field paths, JSON types,
    -- enum values), JSON; rewritten only when it changes.
    CREATE TABLE stream_shapes (
        source     TEXT PRIMARY KEY,
        shape      TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    -- Each drift (new field, missing field, type change, new enum value) once,
    -- with a masked example and how many records showed it.
    CREATE TABLE drift_events (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        source     TEXT NOT NULL,
        kind       TEXT NOT NULL,     -- new_field | missing_field | type_changed | new_enum_value
        path       TEXT NOT NULL,     -- JSON pointer
        detail     TEXT NOT NULL,
        example    TEXT,
        first_seen INTEGER NOT NULL,
        last_seen  INTEGER NOT NULL,
        count      INTEGER NOT NULL DEFAULT 1,
        UNIQUE (source, kind, path, detail)
    );
    "#,
    // 3: the crosswalk of ids destinations gave the records weft wrote
    r#"
    -- One row per (destination system, source system, source key): the id the
    -- destination assigned (an HTTP sink's `capture_id`). The source key is
    -- the flow's entity key, else the event id. Upserted, so a redelivery
    -- after a crash rewrites the same row.
    CREATE TABLE crosswalk (
        system      TEXT NOT NULL,
        source      TEXT NOT NULL,
        source_key  TEXT NOT NULL,
        external_id TEXT NOT NULL,
        flow        TEXT NOT NULL,
        event_id    TEXT NOT NULL,    -- the last event whose write gave the id
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (system, source, source_key)
    );
    CREATE INDEX crosswalk_by_external ON crosswalk (system, external_id);
    "#,
];

/// Bring the schema up to date.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let latest = MIGRATIONS.len() as i64;
    if current > latest {
        return Err(StoreError::Schema(format!(
            "the store's schema version {current} is newer than this weft knows ({latest}); use a newer weft"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// The schema version this build writes.
pub fn latest_version() -> usize {
    MIGRATIONS.len()
}
