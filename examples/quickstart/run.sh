#!/usr/bin/env bash
# The weft quickstart. Needs no service: the store is an embedded SQLite file.
#
#   examples/quickstart/run.sh          # builds weft (release) if needed, then runs the demo
#
# It works in ./quickstart-data (at the repository root): starts `weft run`,
# sends the CRM's webhooks (signed), drops the ERP's CSV export, waits until
# everything is delivered, shows the accounting, the DLQ and the metrics, and
# stops weft with SIGTERM.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WEFT=${WEFT:-${CARGO_TARGET_DIR:-$ROOT/target}/release/weft}
if [ ! -x "$WEFT" ]; then
  echo "== building weft (release; a few minutes the first time)"
  (cd "$ROOT" && cargo build --release -p weft)
fi
for tool in curl openssl; do
  command -v "$tool" >/dev/null || { echo "the quickstart script needs $tool"; exit 1; }
done

WORK=$ROOT/quickstart-data
rm -rf "$WORK"
mkdir -p "$WORK/drop/erp"
cp "$HERE/weft.yaml" "$WORK/weft.yaml"
cd "$WORK"

PORT=${PORT:-8080}
export WEFT_LISTEN=127.0.0.1:$PORT
ADMIN_PORT=${ADMIN_PORT:-9090}
export WEFT_ADMIN_LISTEN=127.0.0.1:$ADMIN_PORT
SECRET=${CRM_WEBHOOK_SECRET:-quickstart-secret}
export CRM_WEBHOOK_SECRET=$SECRET
URL=http://127.0.0.1:$PORT

echo "== weft validate"
"$WEFT" validate weft.yaml

echo "== weft run (log: quickstart-data/weft.log)"
"$WEFT" run weft.yaml > weft.log 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fs "$URL/healthz" >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { echo "weft exited:"; cat weft.log; exit 1; }
  sleep 0.1
done

post() {  # BODY EVENT_ID [SIGNATURE]
  local sig=${3:-sha256=$(printf '%s' "$1" | openssl dgst -sha256 -hmac "$SECRET" | sed 's/^.* //')}
  curl -s -o /dev/null -w "%{http_code}" -X POST "$URL/hooks/crm" \
    -H "content-type: application/json" -H "x-event-id: $2" -H "x-signature-256: $sig" \
    -H "x-correlation-id: quickstart-$2" --data-binary "$1"
}

echo "== the CRM sends 5 contact events (signed)"
n=0
while IFS= read -r line; do
  n=$((n + 1))
  echo "   POST /hooks/crm crm-evt-$n -> $(post "$line" "crm-evt-$n")"
done < "$HERE/data/crm-events.jsonl"
echo "== the CRM retries event 1 (same event id): accepted once, not stored twice"
echo "   POST /hooks/crm crm-evt-1 -> $(post "$(head -n 1 "$HERE/data/crm-events.jsonl")" crm-evt-1)"
echo "== a forged request (bad signature) is refused"
echo "   POST /hooks/crm forged -> $(post '{"id": 666}' forged sha256=0000)"

echo "== the ERP drops its CSV export into drop/erp/"
cp "$HERE/data/erp-customers.csv" drop/erp/.customers.csv.part
mv drop/erp/.customers.csv.part drop/erp/customers.csv

# wait until the CSV has been picked up and nothing is pending
for _ in $(seq 1 150); do
  if [ -f drop/erp/processed/customers.csv ] &&
     "$WEFT" status -c weft.yaml --json | grep -q '"pending": 0' &&
     ! "$WEFT" status -c weft.yaml --json | grep -q '"pending": [1-9]'; then
    break
  fi
  sleep 0.2
done

echo
echo "== weft status"
"$WEFT" status -c weft.yaml
echo
echo "== weft dlq list   (the ERP row with CREDIT_LIMIT 'n/a' could not be mapped)"
"$WEFT" dlq list -c weft.yaml
echo
echo "== out/customers.jsonl (the export)"
cat out/customers.jsonl
echo
echo "== /metrics (excerpt)"
curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -E '^weft_(deliveries_delivered_total|events_received_total|dlq_depth|queue_depth)' || true

echo
echo "== stopping weft (SIGTERM drains in-flight work)"
kill -TERM "$PID"
wait "$PID" || true
trap - EXIT
cat <<MSG

Done. Everything is in quickstart-data/:
  weft.yaml                the config          weft.log        weft's log
  out/accounting.db        the accounting DB   (sqlite3 out/accounting.db 'select * from customers')
  out/customers.jsonl      the export          weft-data/      weft's store (outbox, DLQ, dedupe ids)
Try next (from quickstart-data/):
  $WEFT dlq show -c weft.yaml 1
  $WEFT run weft.yaml        # then post your own event as above, or drop another CSV into drop/erp/
MSG
