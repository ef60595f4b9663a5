#!/usr/bin/env python3
"""Drives `starling serve` with the official `openai` Python client and checks
its answers against `starling run` on the same model.

    openai-client.py --base-url http://127.0.0.1:PORT/v1 --starling BIN --model DIR

Run by tests/server.rs in the virtual environment that
scripts/fetch-test-assets.sh installs (scripts/openai-requirements.txt).
Exits 1 with the first failed check; prints one line per check passed.
"""

import argparse
import subprocess
import sys

import openai


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--starling", required=True, help="the starling binary")
    parser.add_argument("--model", required=True, help="the model the server serves")
    args = parser.parse_args()

    def run(*extra: str) -> str:
        """`starling run` on the same model: the reference answer."""
        out = subprocess.run(
            [args.starling, "run", "--model", args.model, *extra],
            check=True,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        ).stdout
        return out[:-1] if out.endswith("\n") else out

    def check(ok: bool, what: str, detail: object = "") -> None:
        if not ok:
            sys.exit(f"openai-client: FAILED {what}: {detail}")
        print(f"ok {what}")

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)

    models = client.models.list()
    names = [m.id for m in models.data]
    check(len(names) >= 1, "models.list", names)
    model = names[0]
    messages = [{"role": "user", "content": "Hello"}]

    # Greedy, not streamed: the same text as `starling run`.
    expected = run("--temperature", "0", "-n", "24", "Hello")
    reply = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=24
    )
    text = reply.choices[0].message.content
    check(text == expected, "chat greedy equals starling run", (text, expected))
    check(reply.choices[0].finish_reason == "length", "finish_reason length")
    check(reply.usage.completion_tokens == 24, "usage", reply.usage)

    # Streamed, with the usage chunk.
    pieces, usage, reasons = [], None, []
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    check("".join(pieces) == expected, "streamed equals starling run", pieces)
    check(reasons == ["length"], "streamed finish_reason", reasons)
    check(
        usage is not None and usage.completion_tokens == 24,
        "streamed usage chunk",
        usage,
    )
    cached = usage.prompt_tokens_details.cached_tokens
    check(cached > 0, "cached_tokens on a repeated prompt", usage)

    # A stop string from the middle of the answer ends it just before.
    words = expected.split()
    stop = next((w for w in words[1:] if expected.index(w) > 0), None)
    if stop:
        cut = expected.index(stop)
        reply = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=24, stop=[stop]
        )
        check(
            reply.choices[0].message.content == expected[:cut],
            "stop",
            (stop, reply.choices[0].message.content),
        )
        check(reply.choices[0].finish_reason == "stop", "stop finish_reason")

    # n=2 with a seed: choice i is `starling run --seed SEED+i`.
    seed = 1234
    reply = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=1,
        top_p=1,
        max_tokens=8,
        n=2,
        seed=seed,
    )
    got = sorted(reply.choices, key=lambda c: c.index)
    check(len(got) == 2, "n=2 gives two choices", len(got))
    for i, choice in enumerate(got):
        want = run(
            "--temperature", "1", "--top-k", "0", "--top-p", "1", "--min-p", "0",
            "--seed", str(seed + i), "-n", "8", "Hello",
        )
        check(choice.message.content == want, f"n=2 choice {i} equals run --seed {seed + i}",
              (choice.message.content, want))

    # Log-probabilities: one entry per token, the drawn token most likely (greedy).
    reply = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        extra_body={"repetition_penalty": 1},
    )
    content = reply.choices[0].logprobs.content
    check(len(content) == reply.usage.completion_tokens, "one logprob per token", len(content))
    for entry in content:
        check(
            len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
            and entry.logprob <= 0,
            "greedy token is the top logprob",
            entry,
        )

    # A raw prompt: /v1/completions equals `run --template raw`.
    prompt = "The quick brown fox"
    reply = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=10)
    want = run("--template", "raw", "--temperature", "0", "-n", "10", prompt)
    check(reply.choices[0].text == want, "completions equal run --template raw",
          (reply.choices[0].text, want))

    # Errors arrive as the client's typed exceptions.
    try:
        client.chat.completions.create(model="gpt-4", messages=messages, max_tokens=2)
        check(False, "an unknown model is refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model is NotFoundError", e)
    try:
        client.chat.completions.create(model=model, messages=messages, temperature=-1)
        check(False, "a negative temperature is refused")
    except openai.BadRequestError as e:
        check(e.body is not None and e.body.get("param") == "temperature",
              "negative temperature is BadRequestError naming the field", e.body)
    print("openai-client: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
