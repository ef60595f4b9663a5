#!/usr/bin/env python3
"""The chat page in a real browser: headless Chromium (Debian's package)
driven by Playwright, against `starling serve` on the tiny model.

    browser-test.py --url URL --keyed-url URL2 --starling BIN --model DIR --out DIR

URL serves the model without a key, URL2 with one (the page is given a
wrong key there). Run by tests/server.rs through scripts/browser-test.sh.
Exits 1 with the first failed check; prints one line per check passed, the
page's size and its time to first paint, and saves screenshots in --out.
"""

import argparse
import json
import subprocess
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--keyed-url", required=True)
    ap.add_argument("--starling", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()

    def check(ok, what, detail=""):
        if not ok:
            sys.exit(f"browser-test: FAILED {what}: {detail}")
        print(f"ok {what}", flush=True)

    def running():
        text = urllib.request.urlopen(args.url + "/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith("vllm:num_requests_running"):
                return float(line.rsplit(" ", 1)[1])
        return None

    expected = subprocess.run(
        [args.starling, "run", "--model", args.model, "--temperature", "0", "-n", "24", "Hello"],
        check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    ).stdout.rstrip("\n")

    size = sum(len(urllib.request.urlopen(args.url + p, timeout=10).read())
               for p in ("/", "/chat.js", "/chat.css"))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium,
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        # The page asks before an import replaces a conversation: yes.
        page.on("dialog", lambda d: d.accept())
        page.goto(args.url + "/")
        # Time to first contentful paint, from the navigation's start (ms).
        paint = page.evaluate("""() => new Promise((resolve) => {
            const done = (e) => e && resolve(e.startTime);
            done(performance.getEntriesByName('first-contentful-paint')[0]);
            new PerformanceObserver((list) => done(list.getEntriesByName('first-contentful-paint')[0]))
                .observe({type: 'paint', buffered: true});
            setTimeout(() => resolve(-1), 3000);
        })""")
        check(page.title() == "starling", "the page loads", page.title())

        # Greedy settings, then "Hello" with Enter: the streamed answer is run's.
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "24")
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        page.wait_for_function(
            "() => document.querySelectorAll('.msg.assistant').length === 1"
            " && document.getElementById('stop').disabled", timeout=30000)
        stored = page.evaluate("() => JSON.parse(localStorage.getItem('starling.chat.v1')).messages")
        check(stored[1]["content"] == expected, "the streamed answer equals starling run's",
              (stored[1]["content"], expected))
        shown = page.inner_text(".msg.assistant .body")
        check("".join(shown.split()) == "".join(expected.split()), "the answer is shown as sent", shown)
        page.screenshot(path=f"{args.out}/chat-answer.png")
        stats = page.inner_text(".msg.assistant .stats")
        check("24 tokens" in stats and "finish: length" in stats and "first token" in stats
              and "cached prompt tokens" in stats, "figures under the answer", stats)

        # Shift+Enter adds a line; Enter would send.
        page.fill("#input", "a")
        page.press("#input", "Shift+Enter")
        page.type("#input", "b")
        check(page.input_value("#input") == "a\nb", "Shift+Enter adds a line", page.input_value("#input"))

        # Stop during a long answer: the server's running gauge drops to 0.
        page.fill("#max_tokens", "")
        page.fill("#input", "Tell me a very long story")
        page.press("#input", "Enter")
        page.wait_for_function(
            "() => { const m = document.querySelectorAll('.msg.assistant');"
            " return m.length === 2 && m[1].querySelector('.body').textContent.length > 0; }",
            timeout=30000)
        check(running() == 1.0, "the long answer runs on the server")
        page.click("#stop")
        deadline = time.time() + 2
        while running() != 0.0 and time.time() < deadline:
            time.sleep(0.05)
        check(running() == 0.0, "stop ends the sequence on the server within 2 s")
        page.wait_for_function("() => document.getElementById('stop').disabled")
        check("finish: stopped" in page.inner_text(".msg.assistant >> nth=1"), "the answer says it was stopped")

        # A reload finds the conversation.
        page.reload()
        check(page.locator(".msg").count() == 4, "the conversation survives a reload",
              page.locator(".msg").count())

        # Hostile text renders as text: a conversation imported with markup in it.
        hostile = ("Look: <script>window.pwned = 1</script> <img src=x onerror=\"window.pwned = 2\">"
                   "\n\n```html\n<script>window.pwned = 3</script>\n```")
        page.set_input_files("#importFile", files=[{
            "name": "conversation.json", "mimeType": "application/json",
            "buffer": json.dumps([{"role": "user", "content": "show me markup"},
                                  {"role": "assistant", "content": hostile}]).encode()}])
        page.wait_for_function("() => document.querySelectorAll('.msg').length === 2")
        body = page.inner_text(".msg.assistant .body")
        check("<script>window.pwned = 1</script>" in body and "onerror" in body,
              "markup in an answer is shown as text", body)
        check(page.evaluate("() => window.pwned === undefined")
              and page.locator(".msg img, .msg script").count() == 0, "and never runs")
        check(page.locator(".msg.assistant pre button").count() == 1, "a code block gets a copy button")
        page.screenshot(path=f"{args.out}/chat-desktop.png")
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=f"{args.out}/chat-phone.png")
        check(page.locator("#toggle").is_visible(), "a phone-sized window gets the settings button")
        page.click("#toggle")
        check(page.locator("#settings").is_visible(), "which opens the settings")
        page.keyboard.press("Escape")
        check(not page.locator("#settings").is_visible(), "and Escape closes them")
        page.click("#toggle")
        page.click("#closeSettings")
        check(not page.locator("#settings").is_visible(), "as does their Close button")
        page.set_viewport_size({"width": 1280, "height": 800})

        # A stored conversation of the wrong shape is dropped, not fatal.
        page.evaluate("""() => localStorage.setItem('starling.chat.v1',
            '{"messages": [null, {"role": "user", "content": 5}, {"role": "user", "content": "kept"}], "settings": null}')""")
        page.reload()
        check(page.locator(".msg").count() == 1 and page.inner_text(".msg .body") == "kept",
              "a stored conversation of the wrong shape keeps what fits", page.locator(".msg").count())
        page.fill("#max_tokens", "2")
        page.fill("#input", "Hi")
        page.press("#input", "Enter")
        page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 1"
                               " && document.getElementById('stop').disabled", timeout=30000)
        check("2 tokens" in page.inner_text(".msg.assistant .stats"), "and the page still answers")
        # A setting that is not a number is said so, and the typed text stays.
        page.fill("#seed", "1.5")
        page.fill("#input", "again")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.error", timeout=10000)
        check("seed" in page.inner_text(".msg.error") and page.input_value("#input") == "again",
              "a bad setting is named and the message stays in the box", page.inner_text(".msg.error"))

        # A wrong key: the 401 reads as a sentence, not a blank page.
        keyed = browser.new_page(viewport={"width": 1280, "height": 800})
        keyed.goto(args.keyed_url + "/")
        keyed.fill("#key", "wrong")
        keyed.fill("#input", "Hello")
        keyed.press("#input", "Enter")
        keyed.wait_for_selector(".msg.error", timeout=10000)
        text = keyed.inner_text(".msg.error")
        check("API key" in text, "a wrong key shows the 401 message", text)
        check(not errors, "no script errors", errors)
        browser.close()
    print(f"browser-test: page {size} bytes (HTML, script and style), first paint {paint:.0f} ms")
    print("browser-test: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
