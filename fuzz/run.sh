#!/usr/bin/env bash
# Fuzz the file source's readers: each target for MINUTES minutes (default
# 10), one after the other. Not part of CI.
#
#   cargo install cargo-fuzz        # once
#   fuzz/run.sh [MINUTES] [TARGET...]   # targets: csv jsonl json_array xml
#
# cargo-fuzz needs nightly flags (-Zsanitizer); RUSTC_BOOTSTRAP=1 lets a
# stable toolchain accept them. Crashes land in fuzz/artifacts/<target>/,
# the corpus in fuzz/corpus/<target>/, each run's log in fuzz/logs/.
set -euo pipefail
cd "$(dirname "$0")"
minutes=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(csv jsonl json_array xml)
mkdir -p logs
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== $t: $minutes min"
    # -rss_limit_mb: a 32 MiB record limit needs room; -max_len keeps
    # inputs small enough to run fast; -timeout: a hang is a finding
    status=0
    cargo fuzz run "$t" "corpus/$t" -- \
        -max_total_time=$((minutes * 60)) -rss_limit_mb=4096 -max_len=65536 -timeout=10 \
        >"logs/$t.log" 2>&1 || status=$?
    grep -E "^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs" "logs/$t.log" | tail -n 2 || true
    if [ "$status" -ne 0 ]; then
        echo "   $t FAILED (status $status): see logs/$t.log and artifacts/$t/"
    fi
done
