#!/usr/bin/env bash
# Redis Streams through weft: entries/s consumed from a stream (into a JSON
# Lines file), added to a stream (from the generator), and both (stream to
# stream). Durable: every entry is committed to weft's store before it is
# acknowledged (XACK), every add goes through the sink's dedupe script.
#   bench/redis.sh                # N=50000 per scenario, the machine's Redis on 6379
#   N=20000 REDIS_URL=redis://127.0.0.1:6379 bench/redis.sh
# WEFT=path/to/weft uses that binary (e.g. a debug build) instead of the release one.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PROFILE=${PROFILE:-release}
WEFT=${WEFT:-$TARGET/$PROFILE/weft}
BENCH=$TARGET/$PROFILE/weft-redis-bench
FLAG=$([ "$PROFILE" = release ] && echo --release || true)
[ -x "$WEFT" ] || (cd "$ROOT" && cargo build $FLAG -q -p weft)
[ -x "$BENCH" ] || (cd "$ROOT" && cargo build $FLAG -q -p weft-bench --bin weft-redis-bench)
exec "$BENCH" --weft "$WEFT" --url "${REDIS_URL:-redis://127.0.0.1:6379}" --n "${N:-50000}"
