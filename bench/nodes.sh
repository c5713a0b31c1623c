#!/usr/bin/env bash
# Several weft nodes on one PostgreSQL journal (issue 14), 1, 2 and 3 nodes
# on this machine. They share its cores with PostgreSQL and the load
# generator: this is a scaling check (does adding nodes keep the work
# correct and not fall over), not a speed-up claim.
#   bench/nodes.sh                    # N=200000 contacts, 20000 webhooks
#   N=1000000 HOOK_REQUESTS=50000 bench/nodes.sh
#   NODES="1 2" bench/nodes.sh
#
# Rows, for each node count:
# - the standard workload (JSONL file -> jq mapping -> PostgreSQL upsert),
#   every node `weft run --until-idle`: the file source runs on the node
#   holding its lease, every node delivers; wall time until the last node
#   exits, rows checked in the table;
# - signed webhook ingest, 32 clients spread over the nodes, 202 after the
#   commit to the shared journal; then every event delivered exactly once
#   across the nodes' output files (checked).
# And the same two with the SQLite journal (one node) for reference.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
N=${N:-200000}
REQ=${HOOK_REQUESTS:-20000}
NODES=${NODES:-1 2 3}
CACHE=${WEFT_BENCH_CACHE:-$HOME/.cache/weft-bench}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WEFT=$TARGET/release/weft
LOAD=$TARGET/release/weft-bench
WORKROOT=$(mktemp -d "${TMPDIR:-/tmp}/weft-nodes.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  rm -rf "$WORKROOT"
}
trap cleanup EXIT

if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null || ! command -v psql >/dev/null; then
  echo "bench/nodes.sh needs PostgreSQL on 127.0.0.1:5432 and psql" >&2
  exit 1
fi
(cd "$ROOT" && cargo build --release -q -p weft -p weft-bench)

DATA=$CACHE/data/contacts_${N}_s42.jsonl
if [ ! -s "$DATA" ]; then
  mkdir -p "$CACHE/data"
  echo "generating $DATA" >&2
  python3 "$SHARED/gen/generate.py" "$N" "$DATA.tmp" 42 && mv "$DATA.tmp" "$DATA"
fi
export PGHOST=127.0.0.1 PGPORT=5432 PGUSER=${PGUSER:-postgres}
export WEFT_BENCH_DATABASE_URL=postgresql://$PGUSER@127.0.0.1:5432/weft_bench
export WEFT_JOURNAL_URL=postgresql://$PGUSER@127.0.0.1:5432/weft_nodes_journal
export WEFT_LOG=${WEFT_LOG:-warn}
psql -X -q -d postgres -c "CREATE DATABASE weft_bench" 2>/dev/null || true

ROWS=()
now() { date +%s.%N; }
row() { ROWS+=("$(printf '| %-7s | %-44s | %9s | %14s | %s |' "$1" "$2" "$3" "$4" "$5")"); }
fresh_journal() {
  psql -X -q -d postgres -c "DROP DATABASE IF EXISTS weft_nodes_journal WITH (FORCE)" >/dev/null
  psql -X -q -d postgres -c "CREATE DATABASE weft_nodes_journal" >/dev/null
}
fresh_contacts() {
  PGDATABASE=weft_bench psql -X -q -f "$SHARED/common/schema.sql" >/dev/null
}
contacts() { PGDATABASE=weft_bench psql -X -Atc "select count(*) from public.contacts"; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN{printf "%.0f", n/s}'; }
# start a webhook hub of node $1 on port $2 (PostgreSQL journal) and wait for it
start_hub() {
  WEFT_NODE=$1 WEFT_LISTEN=127.0.0.1:$2 "$WEFT" run "$HERE/webhook-pg-journal.yaml" 2>"$WEFT_WORK/hub-$1.log" &
  PIDS+=($!)
  for _ in $(seq 1 200); do curl -fs "http://127.0.0.1:$2/healthz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "node $1 did not start; its log:" >&2; cat "$WEFT_WORK/hub-$1.log" >&2; exit 1
}
# "lines distinct": the output lines of every node and their distinct ids
# (the idempotency key in each CloudEvent envelope)
delivered() {
  python3 - "$WEFT_WORK" <<'PY'
import glob, json, sys
lines, ids = 0, set()
for f in glob.glob(sys.argv[1] + "/out-*.jsonl"):
    for line in open(f):
        if line.strip():
            lines += 1
            ids.add(json.loads(line)["id"])
print(lines, len(ids))
PY
}

# the SQLite journal, one node, for reference
fresh_contacts
export WEFT_INPUT=$DATA WEFT_WORK=$WORKROOT/sqlite; mkdir -p "$WEFT_WORK"
t0=$(now); "$WEFT" run "$HERE/contacts-postgres.yaml" --until-idle; s=$(secs_since "$t0")
row "SQLite" "standard workload, $N records" "$s s" "$(rate "$N" "$s") rec/s" "rows=$(contacts) (want $N)"
rm -rf "$WEFT_WORK"

for n in $NODES; do
  # the standard workload, n nodes
  fresh_journal; fresh_contacts
  export WEFT_WORK=$WORKROOT/file-$n; mkdir -p "$WEFT_WORK"
  t0=$(now); run_pids=()
  for i in $(seq 1 "$n"); do
    WEFT_NODE=node$i "$WEFT" run "$HERE/contacts-pg-journal.yaml" --until-idle 2>"$WEFT_WORK/node$i.log" &
    run_pids+=($!)
  done
  ok=yes
  for p in "${run_pids[@]}"; do wait "$p" || ok="no (a node failed: see its log)"; done
  s=$(secs_since "$t0")
  [ "$ok" = yes ] || cat "$WEFT_WORK"/node*.log >&2
  row "$n node(s)" "standard workload, $N records" "$s s" "$(rate "$N" "$s") rec/s" "rows=$(contacts) (want $N), exit ok: $ok"
  rm -rf "$WEFT_WORK"

  # webhook ingest, n nodes, 32 clients spread over them
  fresh_journal
  export WEFT_WORK=$WORKROOT/hook-$n; mkdir -p "$WEFT_WORK"
  PIDS=()
  for i in $(seq 1 "$n"); do start_hub "node$i" $((18180 + i)); done
  per=$((REQ / n)); conc=$((32 / n))
  t0=$(now); load_pids=()
  for i in $(seq 1 "$n"); do
    "$LOAD" --url "http://127.0.0.1:$((18180 + i))/hooks/crm" --requests "$per" --concurrency "$conc" \
      --id-prefix "n$n-$i" >"$WEFT_WORK/load-$i.txt" &
    load_pids+=($!)
  done
  for p in "${load_pids[@]}"; do wait "$p"; done
  s=$(secs_since "$t0")
  total=$((per * n))
  errs=$(cat "$WEFT_WORK"/load-*.txt | sed 's/.*errors=\([0-9]*\).*/\1/' | paste -sd+ | bc)
  p99=$(cat "$WEFT_WORK"/load-*.txt | sed 's/.*p99_ms=\([0-9.]*\).*/\1/' | sort -g | tail -1)
  # wait for every event to be delivered (not timed)
  got=0
  for _ in $(seq 1 600); do
    got=$(cat "$WEFT_WORK"/out-*.jsonl 2>/dev/null | wc -l)
    [ "$got" -ge "$total" ] && break
    sleep 0.5
  done
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
  read -r lines distinct < <(delivered)
  row "$n node(s)" "webhook ingest, 32 clients over the nodes" "$s s" "$(rate "$total" "$s") req/s" \
    "errors $errs, worst p99 ${p99} ms; delivered $lines lines, $distinct distinct keys (want $total)"
  rm -rf "$WEFT_WORK"
done
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS weft_nodes_journal WITH (FORCE)" >/dev/null

echo
echo "weft nodes bench, N=$N, webhooks=$REQ, $(nproc) cores, $(date -u +%FT%TZ), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"
echo
printf '| %-7s | %-44s | %9s | %14s | %s |\n' "journal" "workload" "wall" "throughput" "checks"
printf '|---|---|---|---|---|\n'
printf '%s\n' "${ROWS[@]}"
