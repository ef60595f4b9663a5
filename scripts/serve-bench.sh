#!/usr/bin/env bash
# The server race of issue 13, kept out of CI: `starling serve` against
# llama.cpp's `llama-server -np 8` on the same GGUF, 2 threads each, in one
# sitting, interleaved. For each concurrency C (1, 4, 8): 16 streamed chat
# requests (short distinct prompts, 32-token answers, temperature 0) through
# the official `openai` client, C at a time; aggregate generation tok/s
# (all completion tokens over the batch's wall time), time to first token
# p50 and max. Beside them, `starling bench` on the same file (prompt and
# generation tok/s at B=1 and 8, and the machine's memory bandwidth).
#
#   scripts/serve-bench.sh GGUF [LLAMA_SERVER]
#   ROUNDS=2 CONC="1 4 8" REQUESTS=16 TOKENS=32 ST=starling-binary ST_ARGS="--batch-tokens 64" scripts/serve-bench.sh GGUF
#
# LLAMA_SERVER defaults to llama.cpp/build/bin/llama-server beside GGUF
# (scripts/race-llama-cpp.sh builds llama.cpp; add the target with
# `cmake -B build -DLLAMA_BUILD_SERVER=ON && cmake --build build --target llama-server`).
set -euo pipefail
gguf=${1:?usage: $0 GGUF [LLAMA_SERVER]}
gguf=$(cd "$(dirname "$gguf")" && pwd)/$(basename "$gguf")
root=$(cd "$(dirname "$0")/.." && pwd)
llama=${2:-$(dirname "$gguf")/llama.cpp/build/bin/llama-server}
st=${ST:-$root/target/release/starling}
rounds=${ROUNDS:-2}
conc=${CONC:-1 4 8}
requests=${REQUESTS:-16}
tokens=${TOKENS:-32}
[ -x "$st" ] || (cd "$root" && cargo build --release)
[ -x "$llama" ] || { echo "serve-bench: no llama-server at $llama" >&2; exit 1; }
bash "$root/scripts/fetch-test-assets.sh"
python="${STARLING_TEST_ASSETS:-$root/target/test-assets}/openai-venv/bin/python"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) (family $(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), model $(grep -m1 '^model\s' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), L1d $(cat /sys/devices/system/cpu/cpu0/cache/index0/size 2>/dev/null))"
echo "file: $gguf ($(du -h "$gguf" | cut -f1))"
cat "$gguf" > /dev/null

# The engine's own figures on the file, this sitting (and the bandwidth).
"$st" bench --model "$gguf" --threads 2 -p 16 -n 8 -r 1 2>&1 | grep -E "^bandwidth" | sed 's/^/bench: /' || true
"$st" bench --model "$gguf" --threads 2 -p 128 -n "$tokens" -r 1 --parallel 1,8 2>&1 \
  | grep -E "^\| " | sed 's/^/bench: /'

port_st=$(free_port); port_ll=$(free_port)
"$st" serve --model "$gguf" --threads 2 --parallel 8 --port "$port_st" ${ST_ARGS:-} \
  </dev/null >/dev/null 2>"$work/starling.log" &
pids+=($!)
"$llama" -m "$gguf" -t 2 -np 8 -c 8192 --port "$port_ll" --host 127.0.0.1 \
  </dev/null >"$work/llama.log" 2>&1 &
pids+=($!)
for url in "http://127.0.0.1:$port_st/health" "http://127.0.0.1:$port_ll/health"; do
  for _ in $(seq 1200); do
    curl -sf "$url" >/dev/null 2>&1 && break
    sleep 0.25
  done
  curl -sf "$url" >/dev/null || { tail "$work"/*.log >&2; echo "serve-bench: $url never ready" >&2; exit 1; }
done

"$python" - "$port_st" "$port_ll" "$rounds" "$requests" "$tokens" $conc <<'PY'
import statistics, sys, threading, time
import openai

port_st, port_ll, rounds, requests, tokens = (int(a) for a in sys.argv[1:6])
conc = [int(c) for c in sys.argv[6:]]
servers = {"starling": port_st, "llama-server": port_ll}
clients = {name: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=600)
           for name, port in servers.items()}
models = {name: c.models.list().data[0].id for name, c in clients.items()}
serial = iter(range(10**9))

def one(name, prompt):
    client = clients[name]
    start = time.time()
    first, count, usage = None, 0, None
    stream = client.chat.completions.create(
        model=models[name], messages=[{"role": "user", "content": prompt}],
        max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content:
                count += 1
                if first is None:
                    first = time.time() - start
    return (first if first is not None else time.time() - start), (usage or count)

def batch(name, c):
    # Distinct prompts in every batch: no server reuses a cached prefix.
    prompts = [f"Request {next(serial)}: write a short note about the number {i}."
               for i in range(requests)]
    lock, results = threading.Lock(), []
    def worker():
        while True:
            with lock:
                if not prompts:
                    return
                p = prompts.pop()
            r = one(name, p)
            with lock:
                results.append(r)
    start = time.time()
    threads = [threading.Thread(target=worker) for _ in range(c)]
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.time() - start
    ttft = sorted(r[0] for r in results)
    return sum(r[1] for r in results) / wall, statistics.median(ttft), ttft[-1]

# Warm both (first-request costs out of the figures).
for name in servers:
    one(name, "warm up")
table = {}
for rnd in range(rounds):
    for c in conc:
        order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
        for name in order:
            tps, p50, mx = batch(name, c)
            table.setdefault((name, c), []).append((tps, p50, mx))
            print(f"round {rnd + 1} C={c} {name}: {tps:.2f} tok/s, ttft p50 {p50:.2f} s, max {mx:.2f} s", flush=True)

print()
print("| C | starling tok/s | llama-server tok/s | ratio | starling TTFT p50 / max (s) | llama-server TTFT p50 / max (s) |")
print("|---|---|---|---|---|---|")
for c in conc:
    med = {n: tuple(statistics.median(x[i] for x in table[(n, c)]) for i in range(3)) for n in servers}
    s, l = med["starling"], med["llama-server"]
    print(f"| {c} | {s[0]:.2f} | {l[0]:.2f} | {s[0] / l[0]:.2f}x | {s[1]:.2f} / {s[2]:.2f} | {l[1]:.2f} / {l[2]:.2f} |")
PY
