#!/usr/bin/env bash
# The `weft` peer of ../shared/bench/run.sh: loads the JSONL file given as the
# last argument into public.contacts through weft's file source, jq mapping and
# PostgreSQL upsert sink, and exits 0 once everything is committed.
#   export WEFT_BENCH_CMD="bench/weft-peer.sh"   (from the repository root)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WEFT=${WEFT:-${CARGO_TARGET_DIR:-$HERE/../target}/release/weft}
export WEFT_INPUT=${!#}
export WEFT_WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-peer.XXXXXX")
trap 'rm -rf "$WEFT_WORK"' EXIT
export WEFT_LOG=${WEFT_LOG:-warn}
"$WEFT" run "$HERE/contacts-postgres.yaml" --until-idle
"$WEFT" status -c "$HERE/contacts-postgres.yaml" >&2
