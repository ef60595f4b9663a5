# Sourced by the scripts that need a Python tool from PyPI (openai,
# schemathesis, Playwright): `pinned_venv DIR REQUIREMENTS` makes DIR a
# virtual environment holding exactly REQUIREMENTS (a pinned list), and does
# nothing when it already does. Built aside and renamed last, so a
# concurrent or interrupted run never sees half an environment.
pinned_venv() {
  local venv=$1 requirements=$2
  if cmp -s "$requirements" "$venv/.complete" 2>/dev/null; then
    return 0
  fi
  mkdir -p "$(dirname "$venv")"
  local partial="$venv.partial.$$"
  rm -rf "$partial"
  python3 -m venv "$partial"
  "$partial/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$requirements" >&2
  cp "$requirements" "$partial/.complete"
  rm -rf "$venv"
  mv "$partial" "$venv" 2>/dev/null || rm -rf "$partial"
}
