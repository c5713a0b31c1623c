#!/usr/bin/env bash
# CDC benchmark: a steady insert load on a PostgreSQL table, read by weft's
# postgres_cdc source and upserted into another table of the same server.
#   bench/cdc.sh                      # RATE=20000 changes/s for SECS=20
#   RATE=5000 SECS=10 bench/cdc.sh
# Prints changes/s delivered and commit-to-delivered lag (p50, p99, max):
# from the source transaction's commit time (the event's
# `source.commit_time`) to the row's insert time in the target
# (`clock_timestamp()` default), both on the server's clock.
# The load is a DO block on the server: every 10 ms one transaction of
# RATE/100 inserted rows. Needs wal_level=logical (.ci/services.sh).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
RATE=${RATE:-20000}
SECS=${SECS:-20}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WEFT=${WEFT:-$TARGET/release/weft}
[ -x "$WEFT" ] || (cd "$ROOT" && cargo build --release -q -p weft)
export PGHOST=127.0.0.1 PGPORT=5432 PGUSER=${PGUSER:-postgres}
DB=weft_bench_cdc
export WEFT_WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-cdc-bench.XXXXXX")
cleanup() {
  [ -n "${HUB:-}" ] && kill "$HUB" 2>/dev/null && wait "$HUB" 2>/dev/null
  psql -X -q -d postgres -c "SELECT pg_drop_replication_slot('weft_bench_cdc') FROM pg_replication_slots WHERE slot_name = 'weft_bench_cdc'" >/dev/null 2>&1 || true
  psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WEFT_WORK"
}
trap cleanup EXIT
[ "$(psql -X -Atc 'SHOW wal_level' -d postgres)" = logical ] || { echo "wal_level is not logical: run .ci/services.sh" >&2; exit 1; }
psql -X -q -d postgres -c "SELECT pg_drop_replication_slot('weft_bench_cdc') FROM pg_replication_slots WHERE slot_name = 'weft_bench_cdc'" >/dev/null
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
export PGDATABASE=$DB WEFT_BENCH_CDC_URL=postgresql://$PGUSER@127.0.0.1:5432/$DB
psql -X -q -c "CREATE TABLE bench_src (id bigint PRIMARY KEY, n int, note text);
  CREATE TABLE bench_dst (id bigint PRIMARY KEY, n int, note text, committed_at timestamptz,
                          written_at timestamptz NOT NULL DEFAULT clock_timestamp());"

WEFT_LOG=warn,weft_connectors::cdc=info "$WEFT" run "$HERE/cdc.yaml" 2>"$WEFT_WORK/weft.log" &
HUB=$!
# streaming once the (empty) snapshot is done
for _ in $(seq 1 100); do grep -q "postgres_cdc: streaming" "$WEFT_WORK/weft.log" && break; sleep 0.1; done
grep -q "postgres_cdc: streaming" "$WEFT_WORK/weft.log" || { cat "$WEFT_WORK/weft.log"; exit 1; }

PER=$((RATE / 100))
echo "load: $RATE changes/s ($PER rows per transaction every 10 ms) for $SECS s" >&2
psql -X -q -c "DO \$\$
DECLARE t0 timestamptz := clock_timestamp(); i int := 0;
BEGIN
  WHILE clock_timestamp() < t0 + make_interval(secs => $SECS) LOOP
    INSERT INTO bench_src SELECT i::bigint * $PER + g, g, 'change' FROM generate_series(1, $PER) g;
    COMMIT;
    i := i + 1;
    PERFORM pg_sleep(greatest(0, extract(epoch FROM t0 + i * interval '10 ms' - clock_timestamp())));
  END LOOP;
END \$\$;"
WANT=$(psql -X -Atc "SELECT count(*) FROM bench_src")
for _ in $(seq 1 600); do
  GOT=$(psql -X -Atc "SELECT count(*) FROM bench_dst")
  [ "$GOT" -ge "$WANT" ] && break
  sleep 0.1
done
psql -X -c "SELECT count(*) AS changes,
    round(count(*) / extract(epoch FROM max(written_at) - min(committed_at))) AS changes_per_s,
    round(1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM written_at - committed_at))::numeric, 1) AS lag_p50_ms,
    round(1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM written_at - committed_at))::numeric, 1) AS lag_p99_ms,
    round(1000 * max(extract(epoch FROM written_at - committed_at))::numeric, 1) AS lag_max_ms
  FROM bench_dst" -c "SELECT $WANT AS inserted"
