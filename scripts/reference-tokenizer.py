#!/usr/bin/env python3
"""Writes tests/data/tokenizer-corpus.json: reference ids for a corpus, from
two tokenizers that do not share starling's code:

  * `spm`  - the sentencepiece library on tokenizer.model.v1;
  * `hf`   - a tokenizer.json made by transformers 4.x's legacy LlamaConverter
             (the converter that wrote the published Mistral/OpenChat files;
             transformers 5 emits another layout), loaded with `tokenizers`.

Run by hand (not in CI), in a throwaway venv:
  pip install sentencepiece==0.2.3 protobuf 'transformers==4.57.*'
  python scripts/reference-tokenizer.py target/test-assets/tokenizer.model.v1
"""
import hashlib, json, sys
import sentencepiece as spm
import transformers
from transformers import LlamaTokenizer
from transformers.convert_slow_tokenizer import LlamaConverter

CORPUS = [
    "Hello world",
    "  two leading spaces",
    "trailing space ",
    "tabs\tand\t\ttabs",
    "multiple   spaces    inside",
    "line\nbreaks\n\nand blank lines\n",
    "日本語のテキストと中文的句子。",
    "emoji 😀 family 👨‍👩‍👧‍👦 flag 🇫🇷 heart ❤️",
    "fn main() {\n    println!(\"hi {}\", 1 + 2);\n}\n",
    "def f(x):\n\treturn x**2  # square",
    "Ünïcödé àçcénts, ß and Ωmega",
    "GPT4 Correct User: Hello",
    "$$$ ~~~ ||| 1234567890 3.14159",
    "non\u00a0breaking\u2009spaces",
    "🦀🦀 rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ",
]

def published_merges(sp):
    """The merge order of transformers <= 4.40 (the published files): every
    split of a piece into two vocab pieces, by the piece's score descending,
    ties in piece order and then by (left id, right id). Later versions also
    break ties by the pieces' lengths."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        score = 0.0 if i < 3 else sp.get_score(i)
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: m[2], reverse=True)
    return [f"{l} {r}" for l, r, _ in merges]

def main(model_path):
    sp = spm.SentencePieceProcessor(model_file=model_path)
    slow = LlamaTokenizer(vocab_file=model_path, legacy=True)
    fast = LlamaConverter(slow).converted()
    doc = json.loads(fast.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    out = {
        "about": __doc__.strip().splitlines()[0],
        "generator": {"transformers": transformers.__version__, "sentencepiece": spm.__version__},
        "tokenizer_model_bytes": len(open(model_path, "rb").read()),
        "vocab_size": doc["model"]["vocab"].__len__(),
        "merges_count": len(merges),
        "merges_sha256": hashlib.sha256("\n".join(merges).encode()).hexdigest(),
        "published_merges_sha256": hashlib.sha256("\n".join(published_merges(sp)).encode()).hexdigest(),
        "normalizer": doc["normalizer"],
        "decoder": doc["decoder"],
        "cases": [
            {"text": t, "hf": fast.encode(t, add_special_tokens=False).ids, "spm": sp.encode(t)}
            for t in CORPUS
        ],
    }
    json.dump(out, open("tests/data/tokenizer-corpus.json", "w"), ensure_ascii=False, indent=1)
    for c in out["cases"]:
        print("same" if c["hf"] == c["spm"] else "DIFF", repr(c["text"]))

if __name__ == "__main__":
    main(sys.argv[1])
