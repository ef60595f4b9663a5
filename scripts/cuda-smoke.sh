#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: checks a CUDA build of starling against
# its own CPU path, then measures it like llama-bench.
#
#   bash scripts/cuda-smoke.sh STARLING MODEL_DIR [bench args...]
#
# STARLING is a `--features cuda` binary (scripts/build-cuda.sh); MODEL a
# small model (a directory, or a GGUF such as
# `starling quantize synthetic:tiny tiny.gguf --type f32 --vocab tokenizer.model`).
# The f32 greedy answers on CUDA must equal the CPU's word for word (the CPU
# path is pinned to transformers by the tests): one prompt alone, then six
# prompts of different lengths through the engine four at a time
# (`run --each-line --parallel 4`), so rows of different sequences and
# positions share each step. f16/bf16 and quantized answers are printed for
# comparison only, since rounding may flip near-ties. Then
# `starling bench --synthetic mistral-7b` runs in bf16 and in Q4_K (override
# with bench args).
set -uo pipefail
bin=$1 model=$2
shift 2
prompt="Hello"
answer() { "$bin" run -m "$model" --template raw --temperature 0 -n 24 "$@" "$prompt" 2>&1; }
lines="Hello
The quick brown fox jumps over the lazy dog, and then it runs far away into the woods
1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30
Why
A longer prompt about nothing in particular, written so that its length differs from every other prompt here, with commas, and more words than the rest of them put together, more or less
Tell me a story"
batched() { "$bin" run -m "$model" --template raw --temperature 0 -n 24 --each-line --parallel 4 "$@" <<<"$lines" 2>&1; }

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
cpu=$(batched --device cpu --dtype f32)
gpu=$(batched --device cuda --dtype f32)
if [[ $cpu != "$gpu" ]]; then
    echo "FAIL: CUDA f32 answers six prompts four at a time differently from the CPU:"
    diff <(echo "$cpu") <(echo "$gpu")
    status=1
else
    echo "ok: six prompts four at a time, CUDA f32 = CPU f32 ($(wc -l <<<"$gpu") lines)"
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
