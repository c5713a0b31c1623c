#!/usr/bin/env bash
# NATS JetStream through weft: messages/s consumed from a stream (into a
# JSON Lines file), published to a stream (from the generator), and both
# (stream to stream). Durable: every message is committed to weft's store
# before it is acked, every publish is acked by the stream.
#   bench/nats.sh                 # N=50000 per scenario, the machine's NATS on 4222
#   N=20000 NATS_URL=nats://127.0.0.1:4222 bench/nats.sh
# WEFT=path/to/weft uses that binary (e.g. a debug build) instead of the release one.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PROFILE=${PROFILE:-release}
WEFT=${WEFT:-$TARGET/$PROFILE/weft}
BENCH=$TARGET/$PROFILE/weft-nats-bench
FLAG=$([ "$PROFILE" = release ] && echo --release || true)
[ -x "$WEFT" ] || (cd "$ROOT" && cargo build $FLAG -q -p weft)
[ -x "$BENCH" ] || (cd "$ROOT" && cargo build $FLAG -q -p weft-bench --bin weft-nats-bench)
exec "$BENCH" --weft "$WEFT" --url "${NATS_URL:-nats://127.0.0.1:4222}" --n "${N:-50000}"
