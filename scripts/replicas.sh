#!/usr/bin/env bash
# Two `starling serve` replicas behind nginx (the Debian package) on
# 127.0.0.1: 32 concurrent chat requests through the official `openai`
# client, and one replica stopped with SIGTERM halfway. Checks that every
# request either completed or was refused with a status a client can retry
# (429, 502, 503, 504, or a refused connection): none lost (an answer cut
# off, another error), none hung; and that the stopped replica drained its
# in-flight requests and exited 0.
#
#   bash scripts/replicas.sh MODEL [REQUESTS] [MAX_TOKENS]
#
# MODEL is anything `starling serve --model` takes. The binary is
# $STARLING, else target/release/starling, else target/debug/starling.
# nginx is installed with apt-get when missing (as root). Everything
# listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail
model=${1:?usage: bash scripts/replicas.sh MODEL [REQUESTS] [MAX_TOKENS]}
requests=${2:-32}
max_tokens=${3:-48}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${STARLING:-}
if [ -z "$bin" ]; then
  for b in "$root/target/release/starling" "$root/target/debug/starling"; do
    [ -x "$b" ] && bin=$b && break
  done
fi
[ -n "$bin" ] || { echo "replicas: build starling first (cargo build --release)" >&2; exit 1; }

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  [ "$(id -u)" = 0 ] || { echo "replicas: nginx is missing (apt-get install nginx)" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq nginx-light >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq nginx-light >/dev/null; }
fi
nginx=$(command -v nginx || echo /usr/sbin/nginx)

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

# Each replica: --parallel 2, so requests queue and some are in flight
# when one replica is stopped; a drain of 30 s, as a Kubernetes
# terminationGracePeriodSeconds would allow.
port_a=$(free_port); port_b=$(free_port); port_lb=$(free_port)
"$bin" serve --model "$model" --port "$port_a" --parallel 2 --shutdown-timeout 30 \
  </dev/null >/dev/null 2>"$work/a.log" &
pid_a=$!
pids+=("$pid_a")
"$bin" serve --model "$model" --port "$port_b" --parallel 2 --shutdown-timeout 30 \
  </dev/null >/dev/null 2>"$work/b.log" &
pids+=($!)
for log in "$work/a.log" "$work/b.log"; do
  for _ in $(seq 600); do
    grep -q " ready on http://" "$log" 2>/dev/null && break
    sleep 0.1
  done
  grep -q " ready on http://" "$log" || { cat "$log" >&2; echo "replicas: a replica did not start" >&2; exit 1; }
done

# nginx: a 503 (a replica draining) or a refused connection (a replica
# gone) sends the request to the other replica, POSTs included (a refused
# request did no work); answers stream through unbuffered.
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log $work/nginx-access.log;
  client_body_temp_path $work/body;
  proxy_temp_path $work/proxy;
  fastcgi_temp_path $work/fastcgi;
  uwsgi_temp_path $work/uwsgi;
  scgi_temp_path $work/scgi;
  upstream starling {
    server 127.0.0.1:$port_a max_fails=1 fail_timeout=60s;
    server 127.0.0.1:$port_b max_fails=1 fail_timeout=60s;
  }
  server {
    listen 127.0.0.1:$port_lb;
    location / {
      proxy_pass http://starling;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 300s;
      proxy_next_upstream error timeout http_502 http_503 non_idempotent;
    }
  }
}
EOF
"$nginx" -c "$work/nginx.conf" -p "$work" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port_lb), 1)" 2>/dev/null && break
  sleep 0.1
done

"$python" - "$port_lb" "$pid_a" "$requests" "$max_tokens" <<'PY'
import concurrent.futures as cf
import os, signal, sys, threading, time
import openai

port, pid_a, n, max_tokens = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# No retries: every outcome is seen as the balancer gave it.
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                       max_retries=0, timeout=120)
MODEL = client.models.list().data[0].id
done = threading.Semaphore(0)
RETRYABLE = {429, 502, 503, 504}

def ask(i):
    # Arrivals spread over the run, so some come after replica A stopped
    # accepting (nginx must send those to B).
    time.sleep(i * 0.25)
    try:
        if i % 2:
            text, reason = [], None
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Question {i}: tell me a story."}],
                max_tokens=max_tokens, temperature=0, stream=True)
            for chunk in stream:
                for c in chunk.choices:
                    text.append(c.delta.content or "")
                    reason = c.finish_reason or reason
            outcome = ("completed", reason) if reason else ("lost", "stream ended without finish_reason")
        else:
            r = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Question {i}: tell me a story."}],
                max_tokens=max_tokens, temperature=0)
            outcome = ("completed", r.choices[0].finish_reason)
    except openai.APIStatusError as e:
        outcome = ("refused" if e.status_code in RETRYABLE else "lost", f"HTTP {e.status_code}")
    except openai.APITimeoutError:
        outcome = ("hung", "timeout")
    except openai.APIConnectionError as e:
        outcome = ("refused", f"connection: {e}")
    except Exception as e:  # noqa: BLE001 - anything else is a lost request
        outcome = ("lost", repr(e))
    done.release()
    return outcome

start = time.time()
with cf.ThreadPoolExecutor(max_workers=n) as pool:
    futures = [pool.submit(ask, i) for i in range(n)]
    # Halfway: when half the requests have finished, stop replica A.
    for _ in range(n // 2):
        done.acquire()
    os.kill(pid_a, signal.SIGTERM)
    stopped_at = time.time() - start
    results = [f.result() for f in futures]
counts = {}
for kind, _ in results:
    counts[kind] = counts.get(kind, 0) + 1
print(f"replicas: {n} requests in {time.time() - start:.1f} s, replica A stopped with SIGTERM at {stopped_at:.1f} s")
print("replicas: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
bad = [(i, r) for i, r in enumerate(results) if r[0] in ("lost", "hung")]
for i, r in bad:
    print(f"replicas: request {i}: {r[0]} ({r[1]})")
sys.exit(1 if bad else 0)
PY
status=0
# Replica A drains and exits 0 (the script's own exit code says whether it did).
for _ in $(seq 350); do kill -0 "$pid_a" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$pid_a" 2>/dev/null; then
  echo "replicas: replica A is still running 35 s after SIGTERM" >&2
  status=1
else
  wait "$pid_a" && code=0 || code=$?
  echo "replicas: replica A exited $code after draining"
  [ "$code" = 0 ] || status=1
fi
served_a=$(grep -c "path=/v1/chat/completions status=200" "$work/a.log" || true)
served_b=$(grep -c "path=/v1/chat/completions status=200" "$work/b.log" || true)
drained=$(grep -c "path=/v1/chat/completions status=503" "$work/a.log" || true)
moved=$(grep -c "connect() failed" "$work/nginx-error.log" 2>/dev/null || true)
echo "replicas: chat answers served by replica A $served_a, by replica B $served_b;" \
  "A answered $drained request(s) with 503 while draining and refused $moved connection(s) after it;" \
  "nginx sent those to B"
exit $status
