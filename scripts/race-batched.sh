#!/usr/bin/env bash
# The batched race of issue 12, kept out of CI: llama.cpp's
# llama-batched-bench against `starling bench --parallel` on the same
# Mistral-7B-shape GGUFs that scripts/race-llama-cpp.sh makes (run it
# first: it builds llama.cpp and writes the files into WORKDIR), 2 threads,
# interleaved, each file read into the page cache first. For each B: B
# streams, each with its own prompt of P tokens, then N generated tokens;
# aggregate prompt and generation tok/s, per stream, peak RSS of the process.
#
#   scripts/race-batched.sh WORKDIR
#   ROUNDS=1 P=128 N=64 NPL=1,2,4,8 FORMATS="q4_k_m q8_0" ST=starling-binary scripts/race-batched.sh WORKDIR
set -euo pipefail
work=${1:?usage: $0 WORKDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$work"
bin=llama.cpp/build/bin
p=${P:-128} n=${N:-64} npl=${NPL:-1,2,4,8}
[ -x $bin/llama-batched-bench ] || cmake --build llama.cpp/build -j2 --target llama-batched-bench
# ST=path races a binary built beforehand (then nothing is built here).
if [ -z "${ST:-}" ]; then (cd "$root" && cargo build --release); fi
st=${ST:-$root/target/release/starling}
# Enough context for every stream of the largest B.
maxb=$(echo "$npl" | tr ',' '\n' | sort -n | tail -1)
ctx=$(( maxb * (p + n) + 64 ))

echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) (family $(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), model $(grep -m1 '^model\s' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), L1d $(cat /sys/devices/system/cpu/cpu0/cache/index0/size 2>/dev/null))"
echo "flags: $(grep -m1 flags /proc/cpuinfo | grep -o -w -E 'avx512f|avx512_vnni|avx512_bf16' | tr '\n' ' ')"
for round in $(seq "${ROUNDS:-1}"); do
  for t in ${FORMATS:-q4_k_m q8_0}; do
    f="m7b-$t.gguf"
    cat "$f" > /dev/null
    echo "== round $round llama.cpp $t"
    /usr/bin/time -v $bin/llama-batched-bench -m "$f" -t 2 -c "$ctx" -b 2048 -ub 512 \
      -npp "$p" -ntg "$n" -npl "$npl" 2>&1 | grep -E "^\|.*[0-9]|PP \||Maximum resident"
    echo "== round $round starling $t"
    /usr/bin/time -v "$st" bench --model "$f" --threads 2 -p "$p" -n "$n" -r 1 \
      --parallel "$npl" 2>&1 | grep -E "^\| |^load|Maximum resident"
  done
done
