#!/usr/bin/env bash
# Every corpus model and every model of testdata/cases, testdata/wild, testdata/forms and testdata/llm, for both targets, as written and with
# --int8, --int8-dynamic and --fp16 (the decoders of testdata/llm also with 8- and 4-bit weights,
# their tied LM heads included): optimized by the release binary (with its output check or
# validation), and every output written run in ONNX Runtime against the original on the
# model's calibration batches (scripts/ort_check.py: within 1e-4 for a lossless run, cosine
# 0.99 for a lossy one, 0.9 for 4-bit weights, whose random-weight models lose ~0.03). Prints
# one line per run and a summary; exits non-zero if any output fails in ONNX Runtime or any
# run is refused.
#
#   scripts/sweep_ort.sh [ONNXOPT_BIN [MODEL...]]   (default: target/release/onnxopt, all models;
#                                                    needs ../shared)
#   SWEEP_TARGETS="ort" SWEEP_MODES="int8" scripts/sweep_ort.sh ...   (a part of the sweep)
#
# Run by hand (it takes minutes); the tests check the same on fewer combinations.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/onnxopt}
shift || true
corpus=${ONNXOPT_CORPUS:-../shared/corpus}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

calib_of() {
    local model=$1 name family
    name=$(basename "$model" .onnx)
    case $model in
    testdata/cases/*|*/testdata/cases/*) echo "testdata/cases/calib/$name" ;;
    testdata/wild/*|*/testdata/wild/*) echo "testdata/wild/calib/$name" ;;
    testdata/forms/*|*/testdata/forms/*) echo "testdata/forms/calib/$name" ;;
    *testdata/llm/*.past.*) echo "testdata/llm/calib/past" ;;
    *testdata/llm/*) echo "testdata/llm/calib/prefill" ;;
    *all-minilm*) echo "$corpus/calib/minilm/dynamic" ;;
    *) family=${name%%.*}; echo "$corpus/calib/$family" ;;
    esac
}

written=0 refused=0 failed=0
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
    models=("$corpus"/tiny/*.onnx "$corpus"/minilm-l6/all-minilm-l6-v2.ts.onnx testdata/cases/*.onnx testdata/wild/*.onnx testdata/forms/*.onnx testdata/llm/*.onnx)
fi
for model in "${models[@]}"; do
    calib=$(calib_of "$model")
    modes=(float int8 int8-dynamic fp16)
    case $model in *testdata/llm/*) modes+=(weights-int8 weights-int4) ;; esac
    if [ -n "${SWEEP_MODES:-}" ]; then read -ra modes <<<"$SWEEP_MODES"; fi
    read -ra targets <<<"${SWEEP_TARGETS:-ort onnx}"
    for target in "${targets[@]}"; do
        for mode in "${modes[@]}"; do
            out="$work/$target.$mode.$(basename "$model")"
            case $mode in
            float) args=() ; check=(--atol 1e-4) ;;
            int8) args=(--int8 --calib "$calib") ; check=(--min-cosine 0.99) ;;
            weights-int8) args=(--weights int8 --lm-head --calib "$calib") ; check=(--min-cosine 0.99) ;;
            weights-int4) args=(--weights int4 --lm-head --calib "$calib") ; check=(--min-cosine 0.9) ;;
            *) args=("--$mode") ; check=(--min-cosine 0.99) ;;
            esac
            if ! log=$("$bin" optimize "$model" "$out" --target "$target" "${args[@]}" 2>&1); then
                refused=$((refused + 1))
                echo "REFUSED $(basename "$model") $target $mode: $(echo "$log" | tail -1)"
                continue
            fi
            written=$((written + 1))
            if result=$(python3 scripts/ort_check.py "${check[@]}" "$model" "$out" "$calib" 2>&1); then
                echo "ok      $(basename "$model") $target $mode: $(echo "$result" | head -1 | sed 's/.*ONNX Runtime/ONNX Runtime/')"
            else
                failed=$((failed + 1))
                echo "FAIL    $(basename "$model") $target $mode: $(echo "$result" | head -1)"
            fi
            rm -f "$out"
        done
    done
done
echo "${#models[@]} models: $written outputs written, $failed failed in ONNX Runtime, $refused refused"
[ "$failed" -eq 0 ] && [ "$refused" -eq 0 ]
