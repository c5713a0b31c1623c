#!/usr/bin/env bash
# MQTT 5 through weft: messages/s consumed from a topic (into a JSON Lines
# file), published to a topic (from the generator), and both (topic to
# topic). Durable on weft's side: every message is committed to weft's
# store before it is acked (PUBACK), every publish is QoS 1 and counted
# once the broker acked it. The bench starts a mosquitto of its own on a
# free port (persistence in a temporary folder, no queue or in-flight
# limits).
#   bench/mqtt.sh                 # N=50000 per scenario
#   N=20000 MOSQUITTO=/usr/sbin/mosquitto bench/mqtt.sh
# WEFT=path/to/weft uses that binary (e.g. a debug build) instead of the release one.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PROFILE=${PROFILE:-release}
WEFT=${WEFT:-$TARGET/$PROFILE/weft}
BENCH=$TARGET/$PROFILE/weft-mqtt-bench
FLAG=$([ "$PROFILE" = release ] && echo --release || true)
[ -x "$WEFT" ] || (cd "$ROOT" && cargo build $FLAG -q -p weft)
[ -x "$BENCH" ] || (cd "$ROOT" && cargo build $FLAG -q -p weft-bench --bin weft-mqtt-bench)
exec "$BENCH" --weft "$WEFT" --mosquitto "${MOSQUITTO:-/usr/sbin/mosquitto}" --n "${N:-50000}"
