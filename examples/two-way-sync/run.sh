#!/usr/bin/env bash
# Two-way sync between a toy CRM and ERP (systems.py, Python 3 standard library).
#   examples/two-way-sync/run.sh
# Works in ./two-way-data at the repository root.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WEFT=${WEFT:-${CARGO_TARGET_DIR:-$ROOT/target}/release/weft}
if [ ! -x "$WEFT" ]; then
  echo "== building weft (release; a few minutes the first time)"
  (cd "$ROOT" && cargo build --release -p weft)
fi
command -v python3 >/dev/null && command -v curl >/dev/null || { echo "needs python3 and curl"; exit 1; }
WORK=$ROOT/two-way-data
rm -rf "$WORK"; mkdir -p "$WORK"; cp "$HERE/weft.yaml" "$WORK/"; cd "$WORK"
export CRM_PORT=${CRM_PORT:-8601} ERP_PORT=${ERP_PORT:-8602} WEFT_LISTEN=127.0.0.1:${PORT:-8080}
export WEFT_ADMIN_LISTEN=127.0.0.1:${ADMIN_PORT:-9090}
CRM=http://127.0.0.1:$CRM_PORT ERP=http://127.0.0.1:$ERP_PORT
python3 "$HERE/systems.py" "$CRM_PORT" "$ERP_PORT" "http://$WEFT_LISTEN" &
SYS=$!
"$WEFT" validate weft.yaml
"$WEFT" run weft.yaml > weft.log 2>&1 &
PID=$!
trap 'kill $PID $SYS 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -fs "http://$WEFT_LISTEN/healthz" >/dev/null 2>&1 && curl -fs "$ERP/customers" >/dev/null 2>&1 && curl -fs "$CRM/customers" >/dev/null 2>&1 && break; sleep 0.1; done
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps(d, indent=1, sort_keys=True))"; }
quiet() { sleep 2; }

echo "== a CRM user creates two customers; weft creates them in the ERP"
c1=$(curl -s "$CRM/create" -d '{"name": "Ada Lovelace", "email": "ada@example.com", "phone": "+44 1"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
curl -s "$CRM/create" -d '{"name": "Alan Turing", "email": "alan@example.com", "phone": "+44 2"}' >/dev/null
quiet; echo "ERP:"; curl -s "$ERP/customers" | j

echo "== the ERP sets a credit limit (it owns them); a CRM user renames Ada; both sides converge"
e1=$(curl -s "$ERP/customers" | python3 -c 'import json,sys; d=json.load(sys.stdin); print([k for k,v in d.items() if v["email"]=="ada@example.com"][0])')
curl -s "$ERP/edit" -d "{\"id\": \"$e1\", \"field\": \"credit_limit\", \"value\": 5000}" >/dev/null
curl -s "$CRM/edit" -d "{\"id\": \"$c1\", \"field\": \"name\", \"value\": \"Ada King\"}" >/dev/null
quiet; echo "CRM:"; curl -s "$CRM/customers" | j; echo "ERP:"; curl -s "$ERP/customers" | j

echo "== a CRM user types a credit limit: the CRM does not own it, weft refuses it"
curl -s "$CRM/edit" -d "{\"id\": \"$c1\", \"field\": \"credit_limit\", \"value\": 999999}" >/dev/null
quiet
"$WEFT" xref show -c weft.yaml customer "crm:$c1"
echo "== the record's history (weft history customer crm:$c1)"
"$WEFT" history -c weft.yaml customer "crm:$c1"
echo "== accounting"
"$WEFT" status -c weft.yaml
