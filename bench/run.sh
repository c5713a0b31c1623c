#!/usr/bin/env bash
# weft's benchmarks, one command, one table:
#   bench/run.sh                 # N=1000000 contacts (the standard workload of ../shared/bench)
#   N=100000 bench/run.sh        # smaller
#   WITH_PEERS=1 bench/run.sh    # also run ../shared/bench/run.sh with weft beside its peers
#
# Rows: the standard workload (JSONL file source -> jq mapping -> sink) into
# SQLite and, when they answer on loopback, PostgreSQL and MariaDB; the same
# through a topic inside the hub; the CSV
# file source alone (canonical CSV -> SQLite);
# webhook ingest (signed POSTs, 202 after the fsynced commit) with latency.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
N=${N:-1000000}
CACHE=${WEFT_BENCH_CACHE:-$HOME/.cache/weft-bench}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WEFT=$TARGET/release/weft
LOAD=$TARGET/release/weft-bench
WORKROOT=$(mktemp -d "${TMPDIR:-/tmp}/weft-bench.XXXXXX")
trap 'rm -rf "$WORKROOT"; [ -n "${HUB:-}" ] && kill "$HUB" 2>/dev/null || true' EXIT

(cd "$ROOT" && cargo build --release -q -p weft -p weft-bench)

DATA=$CACHE/data/contacts_${N}_s42.jsonl
if [ ! -s "$DATA" ]; then
  mkdir -p "$CACHE/data"
  echo "generating $DATA" >&2
  python3 "$SHARED/gen/generate.py" "$N" "$DATA.tmp" 42 && mv "$DATA.tmp" "$DATA"
fi

ROWS=()
now() { date +%s.%N; }
row() { ROWS+=("$(printf '| %-44s | %10s | %12s | %s |' "$1" "$2" "$3" "$4")"); }

# 1. file -> jq -> SQLite
export WEFT_INPUT=$DATA WEFT_WORK=$WORKROOT/sqlite WEFT_LOG=warn
mkdir -p "$WEFT_WORK"
t0=$(now); "$WEFT" run "$HERE/contacts-sqlite.yaml" --until-idle; t1=$(now)
got=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from contacts').fetchone()[0])" "$WEFT_WORK/contacts.db")
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
row "JSONL file -> jq mapping -> SQLite upsert" "$secs s" "$(awk -v n="$N" -v s="$secs" 'BEGIN{printf "%.0f", n/s}') rec/s" "rows=$got (want $N)"
rm -rf "$WEFT_WORK"

# 2. file -> jq -> PostgreSQL (when a server answers)
if (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && command -v psql >/dev/null; then
  export PGHOST=127.0.0.1 PGPORT=5432 PGUSER=${PGUSER:-postgres}
  psql -X -q -d postgres -c "CREATE DATABASE weft_bench" 2>/dev/null || true
  export PGDATABASE=weft_bench WEFT_BENCH_DATABASE_URL=postgresql://$PGUSER@127.0.0.1:5432/weft_bench
  psql -X -q -f "$SHARED/common/schema.sql" >/dev/null
  export WEFT_WORK=$WORKROOT/pg; mkdir -p "$WEFT_WORK"
  t0=$(now); "$WEFT" run "$HERE/contacts-postgres.yaml" --until-idle; t1=$(now)
  got=$(psql -X -Atc "select count(*) from public.contacts")
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
  row "JSONL file -> jq mapping -> PostgreSQL upsert" "$secs s" "$(awk -v n="$N" -v s="$secs" 'BEGIN{printf "%.0f", n/s}') rec/s" "rows=$got (want $N)"
else
  row "JSONL file -> jq mapping -> PostgreSQL upsert" "-" "-" "skipped: no PostgreSQL on 127.0.0.1:5432"
fi

# 3. file -> jq -> MariaDB/MySQL (when a server answers and the client is installed)
if (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null && command -v mariadb >/dev/null; then
  export WEFT_MARIADB_URL=${WEFT_MARIADB_URL:-mysql://root@127.0.0.1:3306/test}
  mariadb -h 127.0.0.1 -u root test -e "DROP TABLE IF EXISTS weft_bench_contacts;
    CREATE TABLE weft_bench_contacts (contact_id BIGINT PRIMARY KEY, given_name VARCHAR(100),
      family_name VARCHAR(100), email VARCHAR(200), company_name VARCHAR(200),
      company_category VARCHAR(40), updated_at DATETIME, address_street VARCHAR(200),
      address_city VARCHAR(100), address_postal_code VARCHAR(20), address_country VARCHAR(10))"
  export WEFT_INPUT=$DATA WEFT_WORK=$WORKROOT/maria; mkdir -p "$WEFT_WORK"
  t0=$(now); "$WEFT" run "$HERE/contacts-mariadb.yaml" --until-idle; t1=$(now)
  got=$(mariadb -h 127.0.0.1 -u root test -N -e "select count(*) from weft_bench_contacts")
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
  row "JSONL file -> jq mapping -> MariaDB upsert" "$secs s" "$(awk -v n="$N" -v s="$secs" 'BEGIN{printf "%.0f", n/s}') rec/s" "rows=$got (want $N)"
  mariadb -h 127.0.0.1 -u root test -e "DROP TABLE IF EXISTS weft_bench_contacts"
  rm -rf "$WEFT_WORK"
else
  row "JSONL file -> jq mapping -> MariaDB upsert" "-" "-" "skipped: no MariaDB on 127.0.0.1:3306 or no mariadb client"
fi

# 3b. the standard workload through a topic inside the hub (publish, then a
# subscriber maps into SQLite): the cost of the hop beside row 1
export WEFT_INPUT=$DATA WEFT_WORK=$WORKROOT/topic
mkdir -p "$WEFT_WORK"
t0=$(now); "$WEFT" run "$HERE/contacts-topic.yaml" --until-idle; t1=$(now)
got=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from contacts').fetchone()[0])" "$WEFT_WORK/contacts.db")
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
row "JSONL file -> topic -> jq mapping -> SQLite" "$secs s" "$(awk -v n="$N" -v s="$secs" 'BEGIN{printf "%.0f", n/s}') rec/s" "rows=$got (want $N)"
rm -rf "$WEFT_WORK"

# 4. CSV file source (the canonical CSV with a header row) -> SQLite, no mapping
CSV=$CACHE/data/contacts_${N}_s42_canonical.csv
[ -s "$CSV" ] || python3 "$SHARED/gen/to_csv.py" "$DATA" "$CSV"
export WEFT_WORK=$WORKROOT/csv; mkdir -p "$WEFT_WORK"
export WEFT_INPUT=$WEFT_WORK/contacts.csv
{ echo "contact_id,given_name,family_name,email,company_name,company_category,updated_at,address_street,address_city,address_postal_code,address_country"; cat "$CSV"; } > "$WEFT_INPUT"
t0=$(now); "$WEFT" run "$HERE/contacts-csv.yaml" --until-idle; t1=$(now)
got=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from contacts').fetchone()[0])" "$WEFT_WORK/contacts.db")
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
row "CSV file -> SQLite upsert (no mapping)" "$secs s" "$(awk -v n="$N" -v s="$secs" 'BEGIN{printf "%.0f", n/s}') rec/s" "rows=$got (want $N)"
rm -rf "$WEFT_WORK"

# 5. webhook ingest
export WEFT_WORK=$WORKROOT/hook WEFT_LISTEN=127.0.0.1:${HOOK_PORT:-18080}
mkdir -p "$WEFT_WORK"
"$WEFT" run "$HERE/webhook.yaml" 2>"$WEFT_WORK/weft.log" &
HUB=$!
for _ in $(seq 1 100); do curl -fs "http://$WEFT_LISTEN/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
for c in 1 32; do
  out=$("$LOAD" --url "http://$WEFT_LISTEN/hooks/crm" --requests "${HOOK_REQUESTS:-20000}" --concurrency "$c" --id-prefix "c$c")
  rps=$(sed 's/.*req_per_s=\([0-9.]*\).*/\1/' <<<"$out")
  p50=$(sed 's/.*p50_ms=\([0-9.]*\).*/\1/' <<<"$out"); p99=$(sed 's/.*p99_ms=\([0-9.]*\).*/\1/' <<<"$out")
  errs=$(sed 's/.*errors=\([0-9]*\).*/\1/' <<<"$out")
  row "webhook ingest, $c client(s), durable before 202" "-" "$rps req/s" "p50 ${p50} ms, p99 ${p99} ms, errors $errs"
done
kill -TERM "$HUB"; wait "$HUB" || true; HUB=

echo
echo "weft bench, N=$N, $(nproc) cores, $(date -u +%FT%TZ), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"
echo
printf '| %-44s | %10s | %12s | %s |\n' "workload" "wall" "throughput" "notes"
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..46})" "$(printf -- '-%.0s' {1..12})" "$(printf -- '-%.0s' {1..14})" "-------"
printf '%s\n' "${ROWS[@]}"

if [ "${WITH_PEERS:-0}" = 1 ]; then
  echo
  export WEFT_BENCH_CMD="$HERE/weft-peer.sh"
  (cd "$ROOT" && RUNS=${RUNS:-1} N=$N "$SHARED/run.sh" copy copy_upsert rust_psql weft diy_python dlt sling nodered)
fi
