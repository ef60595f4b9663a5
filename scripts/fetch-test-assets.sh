#!/usr/bin/env bash
# Fetches the test assets that cannot be committed or built: the real Mistral
# v0.1 SentencePiece model, shipped inside the mistral-common wheel on PyPI,
# real chat templates from the llama-cpp-python source package, and the
# official openai Python client (a virtual environment).
# Idempotent: a cached, verified copy means no network at all.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="${STARLING_TEST_ASSETS:-$root/target/test-assets}"
model="$dest/tokenizer.model.v1"
want_size=493443

mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Real chat templates as models publish them: llama.cpp's collection in the
# llama-cpp-python 0.3.36 source package (tests/templates.rs renders them),
# and llama.cpp's vocabulary test files from the same package (vocab/:
# ggml-vocab-*.gguf with their .inp/.out cases; tests/reward.rs reads the
# Llama SentencePiece one).
# Downloaded from PyPI's file host and checked against the index's sha256.
if [ ! -f "$dest/templates/.complete" ] || [ ! -f "$dest/vocab/.complete" ]; then
  python3 - "$dest" "$tmp" <<'PY'
import hashlib, os, pathlib, sys, tarfile, urllib.request
dest, tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
url = ("https://files.pythonhosted.org/packages/ec/e9/"
       "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
       "llama_cpp_python-0.3.36.tar.gz")
sha = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
sdist = tmp / "llama_cpp_python-0.3.36.tar.gz"
urllib.request.urlretrieve(url, sdist)
digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
if digest != sha:
    sys.exit(f"fetch-test-assets: {sdist.name} has sha256 {digest}, expected {sha}")
import shutil
models = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
wanted = {
    "templates": lambda n: n.startswith(models + "templates/") and n.endswith(".jinja"),
    "vocab": lambda n: n.startswith(models + "ggml-vocab-")
    and os.path.dirname(n) + "/" == models,
}
with tarfile.open(sdist) as tar:
    members = [m for m in tar.getmembers() if m.isfile()]
    for folder, keep in wanted.items():
        out = dest / f"{folder}.partial"
        out.mkdir(parents=True, exist_ok=True)
        for member in members:
            if keep(member.name):
                data = tar.extractfile(member).read()
                (out / os.path.basename(member.name)).write_bytes(data)
        (out / ".complete").write_text("llama-cpp-python==0.3.36\n")
        final = dest / folder
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
PY
fi

# The official openai Python client, pinned, in a virtual environment:
# tests/server.rs drives the server with it (scripts/openai-client.py).
venv="$dest/openai-venv"
requirements="$root/scripts/openai-requirements.txt"
. "$root/scripts/venv.sh"
pinned_venv "$venv" "$requirements"

if [ -f "$model" ] && [ "$(stat -c %s "$model")" = "$want_size" ]; then
  exit 0
fi
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
