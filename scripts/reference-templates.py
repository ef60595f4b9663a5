#!/usr/bin/env python3
"""Reference renderings of real chat templates, as transformers renders them.

Renders every `*.jinja` in TEMPLATES_DIR (the templates models publish, as
llama.cpp's source ships them in models/templates/) on a few conversations
with Python's jinja2 in the environment of transformers'
`apply_chat_template` (transformers/utils/chat_template_utils.py,
`_compile_jinja_template`): ImmutableSandboxedEnvironment with trim_blocks
and lstrip_blocks, the loopcontrols extension and the `{% generation %}`
tag, the filters and globals tojson (json.dumps, ensure_ascii=False),
raise_exception and strftime_now, and the variables messages, tools=None,
documents=None, add_generation_prompt and the special-token strings.
The clock is fixed (NOW below) so the output is reproducible; starling's
test fixes its clock the same way (STARLING_NOW).

Writes JSON: the conversations, the variables, and per template its name,
the sha256 of its source, and per conversation the rendered text or the
error jinja2 raised. tests/templates.rs compares starling's rendering with
it. Needs only jinja2 (pip install jinja2==3.1.6).

Usage: scripts/reference-templates.py TEMPLATES_DIR OUT.json
"""
import datetime
import hashlib
import json
import pathlib
import sys

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

NOW = datetime.datetime(2026, 7, 26, 13, 5, 9)
NOW_UNIX = int(NOW.replace(tzinfo=datetime.timezone.utc).timestamp())

SPECIALS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "  padded  "},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "x"},
    ],
    [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "Say <|im_start|> and </s> and <s> literally"},
        {"role": "assistant", "content": "<|im_end|> ok"},
        {"role": "user", "content": "\n\nThanks  "},
    ],
]


# Templates the collection lacks, kept whole in the output (short enough):
# Llama-2-chat's (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json) and
# Starling-LM-7B-beta's own.
EXTRA = {
    "Llama-2-7b-chat-hf.jinja": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "Starling-LM-7B-beta.jinja": (
        "{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() + ': '"
        " + message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ 'GPT4 Correct Assistant:' }}{% endif %}"
    ),
}


class AssistantTracker(Extension):
    """transformers' `{% generation %}` tag: renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(
            self.call_method("_generation_support"), [], [], body
        ).set_lineno(lineno)

    def _generation_support(self, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def strftime_now(fmt):
    return NOW.strftime(fmt)


def environment():
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[AssistantTracker, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def main():
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    env = environment()
    templates = []
    sources = [(p.name, p.read_text(encoding="utf-8"), False) for p in sorted(src.glob("*.jinja"))]
    sources += [(name, source, True) for name, source in EXTRA.items()]
    for name, source, inline in sources:
        entry = {"name": name, "sha256": hashlib.sha256(source.encode()).hexdigest()}
        if inline:
            entry["source"] = source
        try:
            compiled = env.from_string(source)
        except Exception as e:  # noqa: BLE001 - any compile error is the reference
            entry["compile_error"] = f"{type(e).__name__}: {e}"
            templates.append(entry)
            continue
        renders = []
        for messages in CONVERSATIONS:
            try:
                text = compiled.render(
                    messages=messages,
                    tools=None,
                    documents=None,
                    add_generation_prompt=True,
                    **SPECIALS,
                )
                renders.append({"text": text})
            except Exception as e:  # noqa: BLE001
                renders.append({"error": f"{type(e).__name__}: {e}"})
        entry["renders"] = renders
        templates.append(entry)
    doc = {
        "about": "Chat templates rendered by jinja2 in transformers' apply_chat_template environment",
        "generator": f"scripts/reference-templates.py, jinja2 {jinja2.__version__}",
        "source": "llama-cpp-python==0.3.36 sdist, vendor/llama.cpp/models/templates/",
        "now_unix": NOW_UNIX,
        "variables": SPECIALS,
        "conversations": CONVERSATIONS,
        "templates": templates,
    }
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    ok = sum(1 for t in templates for r in t.get("renders", []) if "text" in r)
    print(f"{len(templates)} templates, {ok} renderings, written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
