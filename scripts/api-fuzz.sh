#!/usr/bin/env bash
# API fuzzing: schemathesis (PyPI, pinned in scripts/schemathesis-requirements.txt,
# installed here into a virtual environment under target/test-assets) tests
# a running `starling serve` against its own /openapi.json: generated and
# mutated requests for every route, checked for server errors (5xx),
# responses that break the documented schema, status codes or content types
# the document does not list, and bad data that is not refused.
#
#   bash scripts/api-fuzz.sh http://127.0.0.1:PORT [SECONDS]
#
# tests/server.rs runs it against the tiny model (a small context, so an
# answer without max_tokens ends quickly). SECONDS bounds the run (default 60).
set -euo pipefail
url=${1:?usage: bash scripts/api-fuzz.sh http://127.0.0.1:PORT [SECONDS]}
seconds=${2:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
dest="${STARLING_TEST_ASSETS:-$root/target/test-assets}"
venv="$dest/schemathesis-venv"
requirements="$root/scripts/schemathesis-requirements.txt"

. "$root/scripts/venv.sh"
pinned_venv "$venv" "$requirements"

# schemathesis keeps a cache (.schemathesis/) in its working directory:
# a scratch one, so nothing lands in the checkout.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"

# Checks: every one that is about the server, none that needs the schema to
# know facts it cannot (a max_tokens beyond the context, an id outside the
# vocabulary are schema-valid and still a 400: positive_data_acceptance is
# left out). A fixed seed makes a failure reproducible. One worker:
# with two, Hypothesis's cache of lambda sources (read when schemathesis
# prints a strategy) raced once and failed the run with a KeyError inside
# the tool, not the server ("Inconsistent results", FlakyFailure).
"$venv/bin/python" -m schemathesis.cli run "$url/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection \
  --max-time "$seconds" \
  --request-timeout 30 \
  --workers 1 \
  --seed 1 \
  --suppress-health-check all \
  --no-color
