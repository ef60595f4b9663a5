#!/usr/bin/env bash
# The race of issue 10, kept out of CI (it builds llama.cpp, 10-20 minutes
# on 2 cores, and writes 27 GB of model files): random weights of the
# Mistral-7B shape written once as a BF16 GGUF by `starling quantize`, then
# quantized to Q4_K_M and Q8_0 by llama.cpp's own `llama-quantize` (so the
# race does not depend on starling's writer); llama.cpp's llama-bench and
# `starling bench` on the SAME files, interleaved, 2 threads, each file read
# into the page cache first (both engines map it). Also: the CPU, the
# bandwidth probe (in starling's lines: the generation ceiling and its
# share), peak RSS of both, and starling's start-up on the cached Q4_K_M.
#
#   scripts/race-llama-cpp.sh WORKDIR
#   ROUNDS=2 P=128 N=64 R=3 BF16_P=64 BF16_N=16 FORMATS="q4_k_m q8_0 bf16" scripts/race-llama-cpp.sh WORKDIR
#   FORMATS="q4_k_m q8_0 q5_k_m q4_0 bf16" ...   (any format llama-quantize names)
set -euo pipefail
work=${1:?usage: $0 WORKDIR}
rounds=${ROUNDS:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work" && cd "$work"
bin=llama.cpp/build/bin

if [ ! -x $bin/llama-bench ] || [ ! -x $bin/llama-quantize ]; then
  # --no-build-isolation: pip reads the sdist's metadata with the
  # scikit-build-core installed here; isolated, `--no-binary :all:` makes it
  # bootstrap cmake from source first (20+ minutes on 2 cores).
  pip install -q cmake scikit-build-core
  pip download -q --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36
  tar xzf llama_cpp_python-0.3.36.tar.gz
  # The sdist's timestamps can lie in the future, which sends make/ninja
  # into endless re-configuration.
  find llama_cpp_python-0.3.36 -exec touch -h {} +
  ln -sfn llama_cpp_python-0.3.36/vendor/llama.cpp llama.cpp
  cmake -S llama.cpp -B llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
  cmake --build llama.cpp/build -j2 --target llama-bench llama-quantize
fi
(cd "$root" && cargo build --release && bash scripts/fetch-test-assets.sh)
st="$root/target/release/starling"
vocab="$root/target/test-assets/tokenizer.model.v1"
[ -f m7b-bf16.gguf ] ||
  "$st" quantize synthetic:mistral-7b m7b-bf16.gguf --type bf16 --vocab "$vocab"
# Each quantized format raced (q4_k_m, q8_0, q5_k_m, q4_0, ...), by
# llama-quantize's name for it; the start-up check needs q4_k_m.
for t in q4_k_m ${FORMATS:-q8_0}; do
  [ "$t" = bf16 ] || [ -f "m7b-$t.gguf" ] ||
    $bin/llama-quantize m7b-bf16.gguf "m7b-$t.gguf" "${t^^}" 2
done

echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) (family $(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), model $(grep -m1 '^model\s' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), L1d $(cat /sys/devices/system/cpu/cpu0/cache/index0/size 2>/dev/null))"
echo "flags: $(grep -m1 flags /proc/cpuinfo | grep -o -w -E 'avx512f|avx512_vnni|avx512_bf16' | tr '\n' ' ')"
for round in $(seq "$rounds"); do
  for t in ${FORMATS:-q4_k_m q8_0 bf16}; do
    f="m7b-$t.gguf"
    p=${P:-128} n=${N:-64}
    if [ "$t" = bf16 ]; then p=${BF16_P:-64} n=${BF16_N:-16}; fi
    cat "$f" > /dev/null
    echo "== round $round llama.cpp $t"
    /usr/bin/time -v $bin/llama-bench -m "$f" -t 2 -p "$p" -n "$n" -r "${R:-3}" 2>&1 |
      grep -E "pp$p|tg$n|Maximum resident"
    echo "== round $round starling $t"
    /usr/bin/time -v "$st" bench --model "$f" --threads 2 -p "$p" -n "$n" -r "${R:-3}" 2>&1 |
      grep -E "pp$p|tg$n|^load|^bandwidth|Maximum resident"
  done
  echo "== round $round starling start-up, m7b-q4_k_m.gguf cached"
  cat m7b-q4_k_m.gguf > /dev/null
  /usr/bin/time -f "wall %e s, peak RSS %M KB" "$st" run -n 1 --template raw --threads 2 \
    --model m7b-q4_k_m.gguf hi 2>&1 | tail -1
done
