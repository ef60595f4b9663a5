#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: checks a CUDA build of starling against
# its own CPU path, then measures it like llama-bench.
#
#   bash scripts/cuda-smoke.sh STARLING MODEL_DIR [bench args...]
#
# STARLING is a `--features cuda` binary (scripts/build-cuda.sh); MODEL_DIR a
# small model directory such as the golden tiny Mistral the tests build
# (target/tmp/tiny-mistral-*). The f32 greedy answer on CUDA must equal the
# CPU's word for word (the CPU path is pinned to transformers by the tests);
# f16/bf16 and quantized answers are printed for comparison only, since
# rounding may flip near-ties. Then `starling bench --synthetic mistral-7b`
# runs in bf16 and in Q4_K (override with bench args).
set -uo pipefail
bin=$1 model=$2
shift 2
prompt="Hello"
answer() { "$bin" run -m "$model" --template openchat --temperature 0 -n 24 "$@" "$prompt" 2>&1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cpu=$(answer --device cpu --dtype f32)
gpu=$(answer --device cuda --dtype f32)
echo "cpu  f32: $cpu"
echo "cuda f32: $gpu"
if [[ $cpu != "$gpu" ]]; then
    echo "FAIL: the CUDA f32 answer differs from the CPU's"
    status=1
else
    echo "ok: CUDA f32 = CPU f32"
    status=0
fi
for dtype in f16 bf16; do
    echo "cuda $dtype: $(answer --device cuda --dtype $dtype)"
done
for q in q8_0 q4k; do
    echo "cpu  $q: $(answer --device cpu --quantize $q)"
    echo "cuda $q: $(answer --device cuda --quantize $q)"
done

if [[ $# -gt 0 ]]; then
    "$bin" bench --device cuda "$@"
else
    "$bin" bench --synthetic mistral-7b --device cuda --dtype bf16 -p 512 -n 128 -r 3
    "$bin" bench --synthetic mistral-7b --device cuda --quantize q4k -p 512 -n 128 -r 3
fi
exit $status
