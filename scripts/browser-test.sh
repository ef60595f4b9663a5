#!/usr/bin/env bash
# The chat page in a real browser: headless Chromium from Debian's packages
# (installed here with apt-get when missing, as root) driven by Playwright
# (PyPI, pinned in scripts/playwright-requirements.txt, in a virtual
# environment under target/test-assets). tests/server.rs runs it against
# two servers on the tiny model; scripts/browser-test.py says what it checks.
#
#   bash scripts/browser-test.sh URL KEYED_URL STARLING MODEL OUT_DIR
set -euo pipefail
url=${1:?usage: bash scripts/browser-test.sh URL KEYED_URL STARLING MODEL OUT_DIR}
keyed=${2:?} bin=${3:?} model=${4:?} out=${5:?}
root=$(cd "$(dirname "$0")/.." && pwd)
dest="${STARLING_TEST_ASSETS:-$root/target/test-assets}"
venv="$dest/playwright-venv"
requirements="$root/scripts/playwright-requirements.txt"

chromium=$(command -v chromium || true)
if [ -z "$chromium" ]; then
  [ "$(id -u)" = 0 ] || { echo "browser-test: chromium is missing (apt-get install chromium)" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }
  chromium=$(command -v chromium)
fi

. "$root/scripts/venv.sh"
pinned_venv "$venv" "$requirements"

mkdir -p "$out"
exec "$venv/bin/python" "$root/scripts/browser-test.py" --url "$url" --keyed-url "$keyed" \
  --starling "$bin" --model "$model" --out "$out" --chromium "$chromium"
