#!/usr/bin/env bash
# RabbitMQ through weft: messages/s consumed from a queue (into a JSON
# Lines file), published to an exchange (from the generator), and both
# (queue to exchange). Durable: every message is committed to weft's store
# before it is acked, every publish is persistent and confirmed.
#   bench/amqp.sh                 # N=50000 per scenario, the machine's RabbitMQ on 5672
#   N=20000 AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f bench/amqp.sh
# WEFT=path/to/weft uses that binary (e.g. a debug build) instead of the release one.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PROFILE=${PROFILE:-release}
WEFT=${WEFT:-$TARGET/$PROFILE/weft}
BENCH=$TARGET/$PROFILE/weft-amqp-bench
FLAG=$([ "$PROFILE" = release ] && echo --release || true)
[ -x "$WEFT" ] || (cd "$ROOT" && cargo build $FLAG -q -p weft)
[ -x "$BENCH" ] || (cd "$ROOT" && cargo build $FLAG -q -p weft-bench --bin weft-amqp-bench)
exec "$BENCH" --weft "$WEFT" --url "${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}" --n "${N:-50000}"
