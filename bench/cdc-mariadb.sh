#!/usr/bin/env bash
# MariaDB CDC benchmark: a steady insert load on a MariaDB table, read by
# weft's mysql_cdc source (the binlog) and upserted into a PostgreSQL table.
#   bench/cdc-mariadb.sh                      # RATE=20000 changes/s for SECS=20
#   RATE=5000 SECS=10 bench/cdc-mariadb.sh
# Prints changes/s delivered and insert-to-delivered lag (p50, p99, max):
# from the source row's insert time (`created_at`, SYSDATE(6) on MariaDB)
# to the row's insert time in the target (`clock_timestamp()` default on
# PostgreSQL), both on this machine's clock. The load is a stored
# procedure: every 10 ms one INSERT (its own transaction) of RATE/100 rows.
# Needs the binlog on in row format (.ci/services.sh).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
RATE=${RATE:-20000}
SECS=${SECS:-20}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WEFT=${WEFT:-$TARGET/release/weft}
[ -x "$WEFT" ] || (cd "$ROOT" && cargo build --release -q -p weft)
export PGHOST=127.0.0.1 PGPORT=5432 PGUSER=${PGUSER:-postgres}
DB=weft_bench_mycdc
my() { mysql -h 127.0.0.1 -P 3306 -uroot -NB "$@"; }
export WEFT_WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-mycdc-bench.XXXXXX")
cleanup() {
  [ -n "${HUB:-}" ] && kill "$HUB" 2>/dev/null && wait "$HUB" 2>/dev/null
  my -e "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WEFT_WORK"
}
trap cleanup EXIT
[ "$(my -e 'SELECT @@log_bin, @@binlog_format')" = "$(printf '1\tROW')" ] \
  || { echo "MariaDB's binlog is not on in row format: run .ci/services.sh" >&2; exit 1; }
my -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
my "$DB" -e "CREATE TABLE bench_src (id BIGINT PRIMARY KEY, n INT, note VARCHAR(20),
  created_at DATETIME(6) NOT NULL) ENGINE=InnoDB"
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
psql -X -q -d $DB -c "CREATE TABLE bench_dst (id bigint PRIMARY KEY, n int, note text, committed_at timestamptz,
                          written_at timestamptz NOT NULL DEFAULT clock_timestamp());"
export WEFT_BENCH_MY_URL=mysql://root@127.0.0.1:3306/$DB
export WEFT_BENCH_PG_URL=postgresql://$PGUSER@127.0.0.1:5432/$DB

WEFT_LOG=warn,weft_connectors::cdc=info "$WEFT" run "$HERE/cdc-mariadb.yaml" 2>"$WEFT_WORK/weft.log" &
HUB=$!
# streaming once the (empty) snapshot is done
for _ in $(seq 1 100); do grep -q "mysql_cdc: streaming" "$WEFT_WORK/weft.log" && break; sleep 0.1; done
grep -q "mysql_cdc: streaming" "$WEFT_WORK/weft.log" || { cat "$WEFT_WORK/weft.log"; exit 1; }

PER=$((RATE / 100))
echo "load: $RATE changes/s ($PER rows per transaction every 10 ms) for $SECS s" >&2
# the client splits statements at ';': the body goes between other delimiters
my "$DB" -e "DELIMITER //
CREATE PROCEDURE bench_load()
BEGIN
  DECLARE t0 DOUBLE DEFAULT UNIX_TIMESTAMP(SYSDATE(6));
  DECLARE i INT DEFAULT 0;
  WHILE UNIX_TIMESTAMP(SYSDATE(6)) < t0 + $SECS DO
    INSERT INTO bench_src SELECT i * $PER + seq, seq, 'change', SYSDATE(6) FROM seq_1_to_$PER;
    SET i = i + 1;
    DO SLEEP(GREATEST(0, t0 + i * 0.01 - UNIX_TIMESTAMP(SYSDATE(6))));
  END WHILE;
END //
DELIMITER ;"
my "$DB" -e "SET time_zone = '+00:00'; CALL bench_load()"
WANT=$(my "$DB" -e "SELECT count(*) FROM bench_src")
for _ in $(seq 1 600); do
  GOT=$(psql -X -Atc "SELECT count(*) FROM bench_dst" -d $DB)
  [ "$GOT" -ge "$WANT" ] && break
  sleep 0.1
done
psql -X -d $DB -c "SELECT count(*) AS changes,
    round(count(*) / extract(epoch FROM max(written_at) - min(committed_at))) AS changes_per_s,
    round(1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM written_at - committed_at))::numeric, 1) AS lag_p50_ms,
    round(1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM written_at - committed_at))::numeric, 1) AS lag_p99_ms,
    round(1000 * max(extract(epoch FROM written_at - committed_at))::numeric, 1) AS lag_max_ms
  FROM bench_dst" -c "SELECT $WANT AS inserted"
