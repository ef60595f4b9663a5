#!/usr/bin/env bash
# Coverage-guided fuzzing of everything starling reads from outside, with
# cargo-fuzz (libFuzzer) on the nightly toolchain; out of CI, which runs the
# in-process harness (tests/fuzz.rs) on stable.
#
#   bash scripts/fuzz.sh MINUTES [TARGET...]
#
# Targets (fuzz/fuzz_targets): gguf pickle safetensors sentencepiece
# tokenizer_json template. MINUTES is shared between them. Corpora grow in
# fuzz/corpus/TARGET (seeded with the harness's valid tiny files and the real
# chat templates); crashes land in fuzz/artifacts/TARGET; logs in fuzz/logs.
set -euo pipefail
minutes=${1:?usage: bash scripts/fuzz.sh MINUTES [TARGET...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf pickle safetensors sentencepiece tokenizer_json template)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# Seeds: the valid files the in-process harness builds (it runs without
# random cases here), and the real templates fetch-test-assets.sh brings.
bash scripts/fetch-test-assets.sh
STARLING_FUZZ_SEEDS="$root/fuzz/corpus" STARLING_FUZZ_SCALE=0 cargo test -q --test fuzz >/dev/null

mkdir -p fuzz/logs
for t in "${targets[@]}"; do
  cargo +nightly fuzz build -O "$t"
done
per=$(( minutes * 60 / ${#targets[@]} ))
[ "$per" -ge 10 ] || per=10
for t in "${targets[@]}"; do
  echo "== $t: $per s" >&2
  # -rss_limit_mb and -timeout: a run that allocates past 2 GB or takes
  # 10 s on one input is a finding, like a crash.
  cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$per" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"fuzz/logs/$t.log" 2>&1 || echo "!! $t stopped with a finding (fuzz/logs/$t.log)" >&2
done

echo "target           runs        cov      ft  corpus  findings"
for t in "${targets[@]}"; do
  log="fuzz/logs/$t.log"
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  line=$(grep -E '^#[0-9]+' "$log" | grep -o 'cov: [0-9]* ft: [0-9]* corp: [0-9]*' | tail -1)
  found=$(find "fuzz/artifacts/$t" -type f 2>/dev/null | wc -l)
  printf '%-15s %8s  %s  %s\n' "$t" "${runs:-?}" "${line:-?}" "$found"
done
