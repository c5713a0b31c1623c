#!/usr/bin/env bash
# Kafka through weft: messages/s consumed from a topic (into a JSON Lines
# file), produced to a topic (from the generator), and both (topic to
# topic). Durable: every batch is committed to weft's store before its
# offsets are committed, every message is counted once the idempotent
# producer's delivery report came.
#   bench/kafka.sh                # N=50000 per scenario, a tansu broker of the bench's own
#   N=20000 KAFKA_BROKERS=127.0.0.1:9092 bench/kafka.sh
# WEFT=path/to/weft uses that binary (e.g. a debug build) instead of the release one.
# TANSU=path/to/tansu names the broker binary (`cargo install tansu --version 0.6.0
# --locked --features dynostore,libsql`).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PROFILE=${PROFILE:-release}
WEFT=${WEFT:-$TARGET/$PROFILE/weft}
BENCH=$TARGET/$PROFILE/weft-kafka-bench
FLAG=$([ "$PROFILE" = release ] && echo --release || true)
[ -x "$WEFT" ] || (cd "$ROOT" && cargo build $FLAG -q -p weft)
[ -x "$BENCH" ] || (cd "$ROOT" && cargo build $FLAG -q -p weft-bench --bin weft-kafka-bench)
ARGS=(--weft "$WEFT" --n "${N:-50000}" --partitions "${PARTITIONS:-1}" --tansu "${TANSU:-tansu}")
[ -n "${KAFKA_BROKERS:-}" ] && ARGS+=(--brokers "$KAFKA_BROKERS")
exec "$BENCH" "${ARGS[@]}"
