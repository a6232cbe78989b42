#!/usr/bin/env bash
# Memory and time of `onnxopt optimize --int4 --int4-method rtn` on a materialized skeleton
# (issue 16's goal: peak RSS <= 1.2 x the output's size + 200 MB, and <= 2 minutes).
#
#   scripts/llm/measure_int4.sh MODEL.onnx OUT.onnx [onnxopt flags...]
#   ONNXOPT=target/release/onnxopt scripts/llm/measure_int4.sh /work/llm-skel/1b/model.onnx \
#       /work/llm-skel/out/1b-int4.onnx --target ort --no-check
#
# Prints one line: sizes in and out (model file plus its .data), peak RSS ("Maximum resident set
# size" of GNU time), wall time, the 1-minute load average before and after (the box may be
# shared), and whether the goal holds. The output is left in place; delete it when done.
set -euo pipefail
model=$1
out=$2
shift 2
onnxopt=${ONNXOPT:-$(dirname "$0")/../../target/release/onnxopt}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

size() { # a model file plus its external data, in bytes
    local total
    total=$(stat -c %s "$1")
    [ -e "$1.data" ] && total=$((total + $(stat -c %s "$1.data")))
    echo "$total"
}
load() { cut -d' ' -f1 /proc/loadavg; }

before=$(load)
/usr/bin/time -v "$onnxopt" optimize "$model" "$out" --int4 --int4-method rtn "$@" >"$log" 2>&1 || {
    cat "$log"
    exit 1
}
after=$(load)
peak_kb=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$log")
wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$log")
seconds=$(awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s }' <<<"$wall")
in_bytes=$(size "$model")
out_bytes=$(size "$out")
awk -v i="$in_bytes" -v o="$out_bytes" -v p="$peak_kb" -v s="$seconds" -v b="$before" -v a="$after" \
    -v flags="$*" 'BEGIN {
    mb = 1e6; goal = 1.2 * o / mb + 200
    ok = (p * 1024 / mb <= goal && s <= 120) ? "meets" : "MISSES"
    printf "in %.0f MB, out %.0f MB, peak RSS %.0f MB (goal %.0f MB), wall %.1f s, load %s -> %s: %s the goal [%s]\n",
        i / mb, o / mb, p * 1024 / mb, goal, s, b, a, ok, flags
}'
