#!/usr/bin/env bash
# Fetches the test assets that cannot be committed or built: the real Mistral
# v0.1 SentencePiece model, shipped inside the mistral-common wheel on PyPI.
# Idempotent: a cached, verified copy means no network at all.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="${STARLING_TEST_ASSETS:-$root/target/test-assets}"
model="$dest/tokenizer.model.v1"
want_size=493443

if [ -f "$model" ] && [ "$(stat -c %s "$model")" = "$want_size" ]; then
  exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  mistral-common==1.13.1 -d "$tmp" >&2
wheel=$(ls "$tmp"/mistral_common-1.13.1-*.whl)
python3 - "$wheel" "$tmp/tokenizer.model.v1" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("mistral_common/data/tokenizer.model.v1")
open(sys.argv[2], "wb").write(data)
PY
size=$(stat -c %s "$tmp/tokenizer.model.v1")
if [ "$size" != "$want_size" ]; then
  echo "fetch-test-assets: tokenizer.model.v1 is $size bytes, expected $want_size" >&2
  exit 1
fi
# Rename last, so a concurrent or interrupted run never sees half a file.
mv "$tmp/tokenizer.model.v1" "$model.partial.$$"
mv "$model.partial.$$" "$model"
