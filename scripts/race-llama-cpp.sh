#!/usr/bin/env bash
# The race of issue 5, kept out of CI (it builds llama.cpp, ~20 minutes on
# 2 cores, and writes 26 GB of model files): random weights of the
# Mistral-7B shape written once by `starling quantize`, then llama.cpp's
# llama-bench and `starling bench` on the SAME files, interleaved, 2 threads.
#
#   scripts/race-llama-cpp.sh WORKDIR
set -euo pipefail
work=${1:?usage: $0 WORKDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work" && cd "$work"

if [ ! -x llama.cpp/build/bin/llama-bench ]; then
  pip install -q cmake ninja scikit-build-core
  pip download -q --no-deps --no-binary llama-cpp-python --no-build-isolation llama-cpp-python==0.3.36
  tar xzf llama_cpp_python-0.3.36.tar.gz
  ln -sfn llama_cpp_python-0.3.36/vendor/llama.cpp llama.cpp
  cmake -S llama.cpp -B llama.cpp/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
  cmake --build llama.cpp/build -j2 --target llama-bench
fi
(cd "$root" && cargo build --release && bash scripts/fetch-test-assets.sh)
st="$root/target/release/starling"
vocab="$root/target/test-assets/tokenizer.model.v1"
for t in q4k q8_0 bf16; do
  [ -f "m7b-$t.gguf" ] || "$st" quantize synthetic:mistral-7b "m7b-$t.gguf" --type "$t" --vocab "$vocab"
done
for round in 1 2; do
  for t in q4k q8_0 bf16; do
    echo "== round $round llama.cpp $t"
    /usr/bin/time -v llama.cpp/build/bin/llama-bench -m "m7b-$t.gguf" -t 2 -p 128 -n 64 -r 3 2>&1 |
      grep -E "pp128|tg64|Maximum resident"
    echo "== round $round starling $t"
    "$st" bench --model "m7b-$t.gguf" --threads 2 -p 128 -n 64 -r 3 | grep -E "pp128|tg64|peak"
  done
done
