#!/usr/bin/env bash
# A second, independent reference for a GGUF that starling runs: llama.cpp's
# own server on the same file must give the same prompt ids and the same
# greedy continuation as `starling run --template raw --temperature 0`.
# Out of CI (it needs a llama.cpp build); the server listens on 127.0.0.1
# only and is stopped on exit.
#
#   LLAMA_SERVER=/path/to/llama-server bash scripts/llama-cpp-crosscheck.sh MODEL.gguf [PROMPT] [N]
#
# tests/families.rs writes a tiny Llama 3 GGUF with `starling quantize`
# (its scratch directory: target/tmp/llama3-quantize-*/llama3.gguf).
set -euo pipefail
model=${1:?usage: LLAMA_SERVER=... bash scripts/llama-cpp-crosscheck.sh MODEL.gguf [PROMPT] [N]}
prompt=${2:-Hello world, this is}
n=${3:-8}
server=${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}
root=$(cd "$(dirname "$0")/.." && pwd)
starling=${STARLING:-$root/target/release/starling}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
LD_LIBRARY_PATH="$(dirname "$server"):${LD_LIBRARY_PATH:-}" \
  "$server" -m "$model" --host 127.0.0.1 --port "$port" -t 2 -c 512 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 120); do
  curl -sf "127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.5
done
python3 - "$port" "$prompt" "$n" "$starling" "$model" <<'PY'
import json, subprocess, sys, urllib.request
port, prompt, n, starling, model = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
def post(path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))
llama_ids = post("/tokenize", {"content": prompt, "add_special": True})["tokens"]
llama = post("/completion", {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1,
                             "cache_prompt": False})["content"]
ours_ids = json.loads(subprocess.run([starling, "tokenize", "--model", model, "--", prompt],
                                     capture_output=True, text=True, check=True).stdout)
# Bytes, decoded without newline translation: text=True would turn a
# generated "\r\n" into "\n" and report a difference that is not there.
ours = subprocess.run([starling, "run", "--model", model, "--template", "raw", "--temperature", "0",
                       "-n", str(n), prompt], capture_output=True, check=True).stdout.decode("utf-8")
ours = ours[:-1] if ours.endswith("\n") else ours
print(f"prompt ids   llama.cpp {llama_ids}\n             starling  {ours_ids}")
print(f"continuation llama.cpp {llama!r}\n             starling  {ours!r}")
ok = llama_ids == ours_ids and llama == ours
print("same" if ok else "DIFFERENT")
sys.exit(0 if ok else 1)
PY
