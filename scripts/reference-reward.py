#!/usr/bin/env python3
"""Writes tests/data/reward-reference.json: reference token ids and rewards
for two tiny reward models (tests/reward-weights.md), computed as the
Starling reward model cards compute them, without starling's code.

torch would pull gigabytes of CUDA wheels, so the cards' classes are
re-implemented in numpy, line by line (see `gpt_reward_model_7b` and
`llama_for_sequence_classification_34b`), over a numpy LlamaModel that
follows transformers' modeling_llama (eager attention, float64). The ids come
from the `tokenizers` library on a tokenizer.json converted by transformers
4.x's LlamaConverter (the published Llama-2 layout, as scripts/
reference-tokenizer.py makes it) from the Mistral v0.1 SentencePiece model:
the cards tokenize their formatted strings with a Hugging Face fast tokenizer,
special tokens parsed, truncation from the left to 2048.

Run by hand (not in CI), in a throwaway venv:
  pip install numpy sentencepiece protobuf 'transformers==4.57.*'
  pip install gguf   # for the second argument
  python scripts/reference-reward.py target/test-assets/tokenizer.model.v1 \
      target/test-assets/vocab/ggml-vocab-llama-spm.gguf
"""
import importlib.util, json, os, sys
import numpy as np
import tokenizers
import transformers
from transformers import LlamaTokenizer, LlamaTokenizerFast
from transformers.convert_slow_tokenizer import LlamaConverter

MAX_LENGTH = 2048  # both cards: truncation=True, max_length=2048

CONFIGS = {
    "rm-7b-shape": {
        "architectures": ["LLMForSequenceRegression"], "model_type": "llama",
        "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False,
    },
    "rm-34b-shape": {
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
        "vocab_size": 32002, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 5000000.0,
        "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 32001,
        "tie_word_embeddings": False,
    },
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "I think it is Lyon, but I am not sure."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Écris un haïku sur la mer 🌊."},
     {"role": "assistant", "content": "Vagues sous la lune,\nle sel chante au rivage —\nla nuit se retire."}],
    [{"role": "user", "content": "fn main() {\n\tprintln!(\"{}\", 1 + 2);\n}\nWhat does it print?"},
     {"role": "assistant", "content": "It prints 3."}],
    # Longer than 2048 tokens: the start is cut, the answer stays.
    [{"role": "user", "content": "Count with me: " + " ".join(str(i) for i in range(1200))},
     {"role": "assistant", "content": "That was a long count; the last number was 1199."}],
]


# More text for the real vocabulary: markup, numbers, whitespace runs.
EXTRA_LLAMA = [
    [{"role": "user", "content": "  leading spaces and\ttabs\n\nparagraphs  "},
     {"role": "assistant", "content": "<b>bold</b> [INST] stays text, 3.14159 and 1,000,000."}],
]


def deterministic(name, k, n):
    """shared/spec/deterministic-weights.md, vectorised over uint32."""
    i = np.arange(n, dtype=np.uint64)
    x = (i * 2654435761 + (k + 1) * 2246822519) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 2246822519) & 0xFFFFFFFF
    x ^= x >> 13
    r = (x >> 8).astype(np.int64) - 8388608
    v = r.astype(np.float32) / np.float32(8388608.0)
    is_norm = name.endswith("layernorm.weight") or name == "model.norm.weight"
    return (np.float32(1.0) + v * np.float32(0.1)) if is_norm else v * np.float32(0.2)


def reward_weights(c):
    """tests/reward-weights.md: the spec's tensors minus lm_head, plus v_head."""
    h, hd = c["hidden_size"], c["head_dim"]
    q, kv, inter = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              "v_head.weight": (1, h)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
    names = sorted(shapes, key=lambda s: s.encode())
    return {n: deterministic(n, k, int(np.prod(shapes[n]))).reshape(shapes[n]).astype(np.float64)
            for k, n in enumerate(names)}


class LlamaModel:
    """transformers' LlamaModel forward (eager attention), float64."""

    def __init__(self, c, w):
        self.c, self.w = c, w

    def rms_norm(self, x, weight):
        variance = (x * x).mean(-1, keepdims=True)
        return weight * (x / np.sqrt(variance + self.c["rms_norm_eps"]))

    def __call__(self, input_ids, attention_mask):
        c, w = self.c, self.w
        n, hd = len(input_ids), c["head_dim"]
        heads, kvh = c["num_attention_heads"], c["num_key_value_heads"]
        position_ids = np.arange(n)
        inv_freq = 1.0 / (c["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        freqs = np.outer(position_ids, inv_freq)
        emb = np.concatenate([freqs, freqs], -1)
        cos, sin = np.cos(emb), np.sin(emb)

        def rotate_half(x):
            return np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)

        # _prepare_4d_causal_attention_mask: causal, and padded keys hidden.
        allowed = np.tril(np.ones((n, n), dtype=bool)) & (np.asarray(attention_mask)[None, :] == 1)
        x = w["model.embed_tokens.weight"][np.asarray(input_ids)]
        for l in range(c["num_hidden_layers"]):
            p = f"model.layers.{l}."
            h = self.rms_norm(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, hd).transpose(1, 0, 2)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kvh, hd).transpose(1, 0, 2)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kvh, hd).transpose(1, 0, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            out = np.empty((heads, n, hd))
            for head in range(heads):  # repeat_kv: query head h reads kv head h // n_rep
                kv = head // (heads // kvh)
                scores = (q[head] @ k[kv].T) / np.sqrt(hd)
                scores = np.where(allowed, scores, np.finfo(np.float64).min)
                scores = scores - scores.max(-1, keepdims=True)
                probs = np.exp(scores)
                probs /= probs.sum(-1, keepdims=True)
                out[head] = probs @ v[kv]
            x = x + out.transpose(1, 0, 2).reshape(n, heads * hd) @ w[p + "self_attn.o_proj.weight"].T
            h = self.rms_norm(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            act = gate / (1.0 + np.exp(-gate))
            x = x + (act * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        return self.rms_norm(x, w["model.norm.weight"])  # last_hidden_state (after the norm)


def card_tokenizer(tok, add_bos):
    """AutoTokenizer as the cards set it up: a LlamaTokenizerFast (BOS added
    for Llama-2, not for Yi), pad_token = unk_token, truncation from the left,
    padding on the right (Llama-2-7b-chat-hf's tokenizer_config)."""
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>", add_bos_token=add_bos, add_eos_token=False)
    fast.pad_token = fast.unk_token
    fast.truncation_side = "left"
    fast.padding_side = "right"
    return fast


def get_reward_encoding(tokenizer, sample):
    """get_reward's encoding (both cards)."""
    enc = tokenizer([sample], truncation=True, max_length=MAX_LENGTH, padding="max_length")
    return enc["input_ids"][0], enc["attention_mask"][0]


def gpt_reward_model_7b(transformer, v_head, tokenizer, sample):
    """Starling-RM-7B-alpha's card: GPTRewardModel.forward."""
    PAD_ID = tokenizer(tokenizer.pad_token)["input_ids"][0]  # BOS: the tokenizer adds it first
    input_ids, attention_mask = get_reward_encoding(tokenizer, sample)
    hidden_states = transformer(input_ids, attention_mask)  # transformer_outputs[0]
    rewards = (hidden_states @ v_head.T)[:, 0]  # self.v_head(hidden_states).squeeze(-1)
    c_inds = [i for i, t in enumerate(input_ids) if t == PAD_ID]
    c_ind = c_inds[0] if len(c_inds) > 0 else len(input_ids)
    card = rewards[c_ind - 1]  # c_ind is 0 (the leading BOS): rewards[-1]
    n = sum(attention_mask)
    last = rewards[n - 1]  # the last real token (the authors' scoring script)
    return input_ids[:n], float(last), float(card)


def llama_for_sequence_classification_34b(transformer, v_head, tokenizer, sample):
    """Starling-RM-34B's card: LlamaForSequenceClassification.forward, PAD_ID = 0."""
    PAD_ID = 0
    input_ids, attention_mask = get_reward_encoding(tokenizer, sample)
    hidden_states = transformer(input_ids, attention_mask)  # hidden_states[-1]: after the norm
    rewards = (hidden_states @ v_head.T)[:, 0]
    c_inds = [i for i, t in enumerate(input_ids) if t == PAD_ID]
    c_ind = c_inds[0] if len(c_inds) > 0 else len(input_ids)
    score = float(rewards[c_ind - 1])
    n = sum(attention_mask)
    return input_ids[:n], score, score


def llama2_sample(messages):
    """The 7B card's `<s>[INST] {prompt} </s> [/INST] {response}</s>` per
    exchange (starling's documented extension: <<SYS>> in the first prompt)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    out = ""
    for i in range(0, len(turns), 2):
        prompt = turns[i]["content"]
        if i == 0 and system is not None:
            prompt = f"<<SYS>>\n{system}\n<</SYS>>\n\n{prompt}"
        out += f"<s>[INST] {prompt} </s> [/INST] {turns[i + 1]['content']}</s>"
    return out


def chatml_sample(messages):
    return "\n".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" for m in messages)


def published_tokenizer(model_path, chatml):
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("reftok", os.path.join(here, "reference-tokenizer.py"))
    reftok = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reftok)
    import sentencepiece as spm
    slow = LlamaTokenizer(vocab_file=model_path, legacy=True)
    doc = json.loads(LlamaConverter(slow).converted().to_str())
    doc["model"]["merges"] = reftok.published_merges(spm.SentencePieceProcessor(model_file=model_path))
    tok = tokenizers.Tokenizer.from_str(json.dumps(doc))
    if chatml:
        tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        assert tok.token_to_id("<|im_start|>") == 32000 and tok.token_to_id("<|im_end|>") == 32001
    return card_tokenizer(tok, add_bos=not chatml)


def spm_model_from_gguf(gguf_path, out_path):
    """The tokenizer.model a GGUF SentencePiece vocabulary came from (Llama's
    normalizer: identity, dummy prefix, whitespace kept), for LlamaTokenizer."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb
    r = gguf.GGUFReader(gguf_path)
    field = lambda k: r.fields[k].contents()
    m = pb.ModelProto()
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    for text, score, kind in zip(field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores"),
                                 field("tokenizer.ggml.token_type")):
        m.pieces.add(piece=text, score=score, type=kinds[kind])
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(m.pieces)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    with open(out_path, "wb") as f:
        f.write(m.SerializeToString())


def main(model_path, llama_gguf=None):
    cases = []
    for name, config in CONFIGS.items():
        chatml = name == "rm-34b-shape"
        tokenizer = published_tokenizer(model_path, chatml)
        w = reward_weights(config)
        transformer = LlamaModel(config, w)
        for messages in CONVERSATIONS:
            if chatml:
                ids, last, card = llama_for_sequence_classification_34b(
                    transformer, w["v_head.weight"], tokenizer, chatml_sample(messages))
            else:
                ids, last, card = gpt_reward_model_7b(
                    transformer, w["v_head.weight"], tokenizer, llama2_sample(messages))
            cases.append({"model": name, "messages": messages, "ids": ids,
                          "score_last": last, "score_card": card})
            print(name, len(ids), f"last={last:.6f} card={card:.6f}")
    # The 7B template's ids on the real Llama SentencePiece vocabulary
    # (llama.cpp's ggml-vocab-llama-spm.gguf), in the published Llama-2 layout.
    llama_cases = []
    if llama_gguf:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            spm_path = os.path.join(tmp, "tokenizer.model")
            spm_model_from_gguf(llama_gguf, spm_path)
            tokenizer = published_tokenizer(spm_path, False)
            for messages in CONVERSATIONS + EXTRA_LLAMA:
                enc = tokenizer([llama2_sample(messages)], truncation=True, max_length=MAX_LENGTH)
                llama_cases.append({"messages": messages, "ids": enc["input_ids"][0]})
                print("llama-spm", len(enc["input_ids"][0]))
    out = {
        "about": __doc__.strip().splitlines()[0],
        "generator": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                      "numpy": np.__version__, "script": "scripts/reference-reward.py"},
        "max_length": MAX_LENGTH,
        "configs": CONFIGS,
        "cases": cases,
        "llama_spm_vocab": "llama-cpp-python 0.3.36 vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf",
        "llama_spm_cases": llama_cases,
    }
    with open("tests/data/reward-reference.json", "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
