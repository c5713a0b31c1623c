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
    // 4: the journal (see journal.rs): key queues with per-row state, leases,
    // holds, a lean dedupe table instead of the inbox, write outcomes.
    // The data of a version-3 store is carried over by `carry_over_v3`.
    r#"
    -- state: 0 queued (behind the head of its key queue), 1 ready (a head, due),
    -- 2 leased (next_at = the lease's deadline), 3 waiting (a head in backoff
    -- until next_at), 4 held (a head whose key a dead letter holds).
    CREATE TABLE outbox_v4 (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        flow            TEXT NOT NULL,
        destination     TEXT NOT NULL,
        entity_key      TEXT,
        idempotency_key TEXT NOT NULL,
        source          TEXT NOT NULL,
        event_id        TEXT NOT NULL,
        correlation_id  TEXT NOT NULL,
        created_at      INTEGER NOT NULL,     -- when weft accepted the event, ms
        event_time      INTEGER NOT NULL,     -- the event's own time, ms
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_at         INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT,
        order_seq       INTEGER NOT NULL,     -- place in its key queue (journal_meta 'order_seq')
        state           INTEGER NOT NULL,
        token           INTEGER NOT NULL DEFAULT 0,
        source_version  TEXT,
        group_id        TEXT,
        traceparent     TEXT,
        tracestate      TEXT,
        payload         TEXT NOT NULL
    );
    INSERT INTO outbox_v4 (id, flow, destination, entity_key, idempotency_key, source, event_id,
        correlation_id, created_at, event_time, attempts, next_at, last_error, order_seq, state, payload)
      SELECT id, flow, destination, entity_key, idempotency_key, source, event_id, correlation_id,
        created_at, created_at, attempts, next_at, last_error, COALESCE(order_seq, id), 0, payload
      FROM outbox;
    DROP TABLE outbox;
    ALTER TABLE outbox_v4 RENAME TO outbox;
    CREATE INDEX outbox_lane ON outbox (flow, destination, state, order_seq);
    CREATE INDEX outbox_key ON outbox (destination, entity_key, order_seq) WHERE entity_key IS NOT NULL;
    CREATE INDEX outbox_timer ON outbox (next_at) WHERE state IN (2, 3);
    UPDATE outbox SET state = CASE WHEN attempts > 0 AND next_at > 0 THEN 3 ELSE 1 END
      WHERE entity_key IS NULL OR order_seq = (SELECT min(o.order_seq) FROM outbox o
        WHERE o.destination = outbox.destination AND o.entity_key = outbox.entity_key);

    -- Keys a dead letter holds at a destination (on_dead_letter: hold_key).
    CREATE TABLE holds (
        destination TEXT NOT NULL,
        entity_key  TEXT NOT NULL,
        dlq_id      INTEGER NOT NULL,
        PRIMARY KEY (destination, entity_key, dlq_id)
    ) WITHOUT ROWID;
    CREATE INDEX holds_by_entry ON holds (dlq_id);

    -- Dedupe ids of sources that cannot replay exactly: 16 bytes of the
    -- SHA-256 of the event id, pruned in `seq` order past the retention.
    CREATE TABLE dedupe (
        seq         INTEGER PRIMARY KEY,
        source      TEXT NOT NULL,
        id_hash     BLOB NOT NULL,
        accepted_at INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX dedupe_by_id ON dedupe (source, id_hash);

    -- Counters the journal allocates from (order_seq).
    CREATE TABLE journal_meta (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO journal_meta (name, value) VALUES ('order_seq',
      max(COALESCE((SELECT max(order_seq) FROM outbox), 0),
          COALESCE((SELECT max(order_seq) FROM dlq), 0),
          COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0)));

    -- DLQ: the CloudEvents attributes (map-stage replays re-run the flow with
    -- them; the inbox that kept them is gone) and the event that superseded
    -- a dead entry (a later write of its key, delivered).
    ALTER TABLE dlq ADD COLUMN attributes TEXT;
    ALTER TABLE dlq ADD COLUMN superseded_by TEXT;
    CREATE INDEX dlq_dead_by_key ON dlq (entity_key) WHERE status = 'dead' AND entity_key IS NOT NULL;
    UPDATE dlq SET attributes = (SELECT i.attributes FROM inbox i
      WHERE i.source = dlq.source AND i.event_id = dlq.event_id);

    -- Later writes of a dead entry's key that were delivered (one per flow
    -- and destination, the last): replaying the entry would regress them.
    CREATE TABLE superseded (
        dlq_id      INTEGER NOT NULL,
        flow        TEXT NOT NULL,
        destination TEXT NOT NULL,
        event_id    TEXT NOT NULL,
        PRIMARY KEY (dlq_id, flow, destination)
    ) WITHOUT ROWID;

    -- Write outcomes kept with the crosswalk entry.
    ALTER TABLE crosswalk ADD COLUMN version TEXT;
    ALTER TABLE crosswalk ADD COLUMN fingerprint TEXT;
    "#,
    // 5: identity. Canonical records, the links of each to the systems that
    // hold it (their id and the values each is known to hold), match keys,
    // the history of every change and open manual conflicts.
    r#"
    CREATE TABLE canonical (
        entity       TEXT NOT NULL,
        id           TEXT NOT NULL,
        state        TEXT NOT NULL,
        meta         TEXT NOT NULL,
        version      INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        PRIMARY KEY (entity, id)
    ) WITHOUT ROWID;
    CREATE TABLE links (
        entity       TEXT NOT NULL,
        canonical_id TEXT NOT NULL,
        system       TEXT NOT NULL,
        external_id  TEXT,
        base         TEXT,
        written      TEXT,
        fingerprint  TEXT,
        how          TEXT NOT NULL,
        updated_at   INTEGER NOT NULL,
        PRIMARY KEY (entity, canonical_id, system)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX links_by_external ON links (entity, system, external_id)
        WHERE external_id IS NOT NULL;
    CREATE TABLE match_keys (
        entity       TEXT NOT NULL,
        field        TEXT NOT NULL,
        value        TEXT NOT NULL,
        canonical_id TEXT NOT NULL,
        PRIMARY KEY (entity, field, value, canonical_id)
    ) WITHOUT ROWID;
    CREATE TABLE canonical_history (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        entity         TEXT NOT NULL,
        canonical_id   TEXT NOT NULL,
        at             INTEGER NOT NULL,
        system         TEXT NOT NULL,
        event_id       TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        action         TEXT NOT NULL,
        detail         TEXT NOT NULL
    );
    CREATE INDEX canonical_history_by_record ON canonical_history (entity, canonical_id, id);
    CREATE INDEX canonical_history_by_correlation ON canonical_history (correlation_id);
    CREATE TABLE conflicts (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        entity         TEXT NOT NULL,
        canonical_id   TEXT NOT NULL,
        field          TEXT NOT NULL,
        current        TEXT NOT NULL,
        current_system TEXT NOT NULL,
        proposed       TEXT NOT NULL,
        system         TEXT NOT NULL,
        event_id       TEXT NOT NULL,
        status         TEXT NOT NULL,
        created_at     INTEGER NOT NULL,
        resolved_at    INTEGER
    );
    CREATE INDEX conflicts_open ON conflicts (entity, canonical_id) WHERE status = 'open';
    "#,
    // 6: fuzzy matching and merges. Blocking values per record (candidates
    // share one), reports held for review, an index that lets a record's
    // match keys be replaced without a scan, and merged records' tombstones.
    r#"
    CREATE INDEX match_keys_by_record ON match_keys (entity, canonical_id);
    -- a record merged into another (`weft xref merge`) stays as a tombstone
    ALTER TABLE canonical ADD COLUMN merged_into TEXT;
    CREATE TABLE match_blocks (
        entity       TEXT NOT NULL,
        block        TEXT NOT NULL,
        canonical_id TEXT NOT NULL,
        PRIMARY KEY (entity, block, canonical_id)
    ) WITHOUT ROWID;
    CREATE INDEX match_blocks_by_record ON match_blocks (entity, canonical_id);
    CREATE TABLE matches (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        entity         TEXT NOT NULL,
        system         TEXT NOT NULL,
        external_id    TEXT NOT NULL,
        candidate      TEXT NOT NULL,
        score          REAL NOT NULL,
        detail         TEXT NOT NULL,
        fields         TEXT NOT NULL,
        changed_at     INTEGER,
        event_id       TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        event_time     INTEGER NOT NULL,
        status         TEXT NOT NULL,
        created_at     INTEGER NOT NULL,
        resolved_at    INTEGER,
        note           TEXT
    );
    CREATE UNIQUE INDEX matches_open ON matches (entity, system, external_id) WHERE status = 'open';
    -- per entity, how many history entries of each action (created,
    -- create_refused, refused, conflict, ...), counted with the entry
    CREATE TABLE identity_counts (
        entity TEXT NOT NULL,
        action TEXT NOT NULL,
        n      INTEGER NOT NULL,
        PRIMARY KEY (entity, action)
    ) WITHOUT ROWID;
    "#,
    // 7: freshness. When a flow last received a record (ms), on its
    // flow-level counts row (destination ''), set in the ingest's
    // transaction: `weft status` and a restarted hub know it.
    r#"
    ALTER TABLE flow_counts ADD COLUMN last_received_at INTEGER;
    "#,
    // 8: accepted drift. An operator accepted the drift (`weft drift
    // accept`, the dashboard): records showing it are no longer quarantined.
    r#"
    ALTER TABLE drift_events ADD COLUMN accepted_at INTEGER;
    "#,
    // 9: creates in flight. A record weft is creating in a system has a link
    // without the system's id until the create settles; a report from that
    // system of an id it has no link for is checked against these first
    // (`canonical::pending_create`): its webhook may overtake the response.
    r#"
    CREATE INDEX links_pending ON links (entity, system, updated_at)
        WHERE external_id IS NULL AND written IS NOT NULL;
    "#,
    // 10: retention (review P1-20). A DLQ entry replayed or discarded keeps
    // when (`resolved_at`, taken from its history's last line for entries
    // resolved before) and only the SHA-256 of its payload (computed by
    // `carry_over_v9`: SQLite has no SHA-256); the prune deletes resolved
    // entries past `store.dlq_retention` and drift events last seen before
    // `store.drift_retention`, each by its index.
    r#"
    ALTER TABLE dlq ADD COLUMN resolved_at INTEGER;
    ALTER TABLE dlq ADD COLUMN payload_sha256 TEXT;
    UPDATE dlq SET resolved_at = coalesce(
        json_extract(history, '$[' || (json_array_length(history) - 1) || '].at'), failed_at)
      WHERE status <> 'dead';
    CREATE INDEX dlq_resolved ON dlq (resolved_at) WHERE status <> 'dead';
    CREATE INDEX drift_by_last_seen ON drift_events (last_seen);
    "#,
    // 11: the attempt trail (issue 15). Every write of a row to its
    // destination (delivered, retried, dead-lettered), written by the
    // settle that decides it: when, how long, the HTTP status, the error.
    // Looked up by event id, correlation id or entity key (the record
    // inspector, `weft record`); pruned past `store.attempt_retention` in
    // id order (ids follow `at` closely: no index on it to maintain).
    r#"
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        flow TEXT NOT NULL,
        destination TEXT NOT NULL,
        event_id TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        entity_key TEXT,
        attempt INTEGER NOT NULL,
        at INTEGER NOT NULL,
        latency_ms INTEGER NOT NULL,
        status INTEGER,
        outcome TEXT NOT NULL,
        error TEXT
    );
    CREATE INDEX attempts_by_event ON attempts (event_id);
    CREATE INDEX attempts_by_correlation ON attempts (correlation_id);
    CREATE INDEX attempts_by_key ON attempts (entity_key) WHERE entity_key IS NOT NULL;
    "#,
    // 12: topics inside the hub (`topic.rs`): one log for every topic,
    // a publication once per (topic, id)
    r#"
    CREATE TABLE topic_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        id TEXT NOT NULL,
        entity_key TEXT,
        payload TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        causation_id TEXT NOT NULL,
        flow TEXT NOT NULL,
        event_time INTEGER NOT NULL,
        traceparent TEXT,
        tracestate TEXT,
        published_at INTEGER NOT NULL,
        UNIQUE (topic, id)
    );
    CREATE INDEX topic_messages_by_topic ON topic_messages (topic, seq);
    "#,
];

/// After migration 10's SQL: entries resolved before it keep only the hash
/// of their payload, like those resolved after.
fn carry_over_v9(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    let resolved: Vec<(i64, String)> = {
        let mut st = tx.prepare("SELECT id, payload FROM dlq WHERE status <> 'dead'")?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    let mut up = tx.prepare("UPDATE dlq SET payload = '', payload_sha256 = ?2 WHERE id = ?1")?;
    for (id, payload) in resolved {
        up.execute(rusqlite::params![id, crate::payload_sha256(&payload)])?;
    }
    Ok(())
}

/// After migration 4's SQL: the inbox's event ids become dedupe hashes
/// (computed here: SQLite has no SHA-256), then the inbox goes.
fn carry_over_v3(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    {
        let mut sel = tx.prepare("SELECT source, event_id, received_at FROM inbox ORDER BY seq")?;
        let mut ins = tx.prepare(
            "INSERT OR IGNORE INTO dedupe (source, id_hash, accepted_at) VALUES (?1, ?2, ?3)",
        )?;
        let mut rows = sel.query([])?;
        while let Some(r) = rows.next()? {
            let (source, id, at): (String, String, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
            ins.execute(rusqlite::params![source, crate::writer::id_hash(&id), at])?;
        }
    }
    tx.execute_batch("DROP TABLE inbox;")?;
    Ok(())
}

/// The schema version of the store at `conn`.
pub(crate) fn version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// Bring the schema up to date.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_to(conn, MIGRATIONS.len())
}

/// Apply the migrations up to `target`.
pub(crate) fn migrate_to(conn: &mut Connection, target: usize) -> Result<(), StoreError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let latest = MIGRATIONS.len() as i64;
    if current > latest {
        return Err(StoreError::Schema(format!(
            "the store's schema version {current} is newer than this weft knows ({latest}); use a newer weft"
        )));
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target)
        .skip(current as usize)
    {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        if i == 3 {
            carry_over_v3(&tx)?;
        }
        if i == 9 {
            carry_over_v9(&tx)?;
        }
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// The schema version this build writes.
pub fn latest_version() -> usize {
    MIGRATIONS.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migration 10 on a store resolved before it: a replayed or discarded
    /// entry gets its resolve time from its history's last line and keeps
    /// only the hash of its payload; a dead entry keeps its payload.
    #[test]
    fn migration_10_drops_the_payloads_of_resolved_entries() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 9).unwrap();
        for (id, status, history) in [
            (
                1,
                "replayed",
                r#"[{"at":5},{"at":700,"action":"replayed"}]"#,
            ),
            (
                2,
                "discarded",
                r#"[{"at":5},{"at":800,"action":"discarded"}]"#,
            ),
            (3, "dead", r#"[{"at":5}]"#),
        ] {
            conn.execute(
                "INSERT INTO dlq (id, status, stage, flow, source, event_id, correlation_id,
                   created_at, failed_at, attempts, error, payload, history)
                 VALUES (?1, ?2, 'deliver', 'f', 's', 'e', 'c', 1, 5, 1, 'x', ?3, ?4)",
                rusqlite::params![id, status, format!("{{\"n\":{id}}}"), history],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        assert_eq!(version(&conn).unwrap(), MIGRATIONS.len() as i64);
        let rows: Vec<(i64, Option<i64>, String, Option<String>)> = conn
            .prepare("SELECT id, resolved_at, payload, payload_sha256 FROM dlq ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            [
                (
                    1,
                    Some(700),
                    String::new(),
                    Some(crate::payload_sha256("{\"n\":1}"))
                ),
                (
                    2,
                    Some(800),
                    String::new(),
                    Some(crate::payload_sha256("{\"n\":2}"))
                ),
                (3, None, "{\"n\":3}".to_owned(), None),
            ]
        );
    }
}
