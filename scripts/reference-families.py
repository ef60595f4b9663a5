#!/usr/bin/env python3
"""Writes tests/data/family-reference.json: logits and greedy ids from
transformers itself for tiny models of the Llama 3 family (rope_scaling
llama3, tied embeddings, GQA), Llama with linear and with dynamic rope
scaling, and Qwen2 (q/k/v biases, tied embeddings), on the weights of
tests/family-weights.md.

transformers' LlamaForCausalLM / Qwen2ForCausalLM run in float64 with eager
attention (rope's frequencies and angles stay float32 there, as in every
dtype). Logits come from one forward pass over the prompt; greedy ids from
the cached loop generate() runs (the prompt in one pass, then a token per
pass), which is what starling's cached loop must reproduce. With dynamic
scaling the two differ past the original context: a pass's frequencies
depend on the sequence's length at that pass.

Run by hand (not in CI; torch from PyPI is about 5 GB with its CUDA wheels,
and runs on the CPU without a GPU):
    python -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch 'transformers==4.57.*' numpy
    /tmp/torchvenv/bin/python scripts/reference-families.py
"""
import json

import numpy as np
import torch
import transformers

BASE = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
    "bos_token_id": 1, "eos_token_id": 2,
}
CONFIGS = {
    "tiny-llama3": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                        rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}),
    "tiny-llama-linear": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                              rope_theta=10000.0, tie_word_embeddings=False,
                              rope_scaling={"type": "linear", "factor": 4.0}),
    "tiny-llama-dynamic": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                               rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=64,
                               rope_scaling={"type": "dynamic", "factor": 4.0}),
    "tiny-qwen2": dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                       rope_theta=1000000.0, tie_word_embeddings=True,
                       use_sliding_window=False, sliding_window=32),
}
PROMPTS = [
    [1, 17, 300, 42, 99, 511, 7, 260, 13, 13, 480, 5],
    [1] + [(i * 37 + 11) % 512 for i in range(80)],  # beyond the 64 original positions
    [1] + [(i * 53 + 7) % 512 for i in range(59)],  # its answer crosses position 64
]
GREEDY = 8


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


def biases(c):
    if c["model_type"] == "qwen2":
        return ["q", "k", "v"]
    return ["q", "k", "v", "o"] if c.get("attention_bias") else []


def weights(c):
    """tests/family-weights.md: the spec's tensors, plus attention biases,
    without lm_head when the embeddings are tied."""
    h, hd = c["hidden_size"], c["head_dim"]
    q, kv, inter = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    outs = {"q": q, "k": kv, "v": kv, "o": h}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
        for b in biases(c):
            shapes[p + f"self_attn.{b}_proj.bias"] = (outs[b],)
    names = sorted(shapes, key=lambda s: s.encode())
    return {n: deterministic(n, k, int(np.prod(shapes[n]))).reshape(shapes[n]).astype(np.float64)
            for k, n in enumerate(names)}


def model_of(c):
    """A fresh transformers model (float64, eager attention) holding the
    weights of tests/family-weights.md. Fresh per run: dynamic rope scaling
    keeps state (the longest sequence seen) in the model."""
    qwen = c["model_type"] == "qwen2"
    config_class = transformers.Qwen2Config if qwen else transformers.LlamaConfig
    model_class = transformers.Qwen2ForCausalLM if qwen else transformers.LlamaForCausalLM
    args = {k: v for k, v in c.items() if k not in ("architectures", "model_type")}
    model = model_class(config_class(**args, attn_implementation="eager")).double().eval()
    state = {n: torch.from_numpy(w) for n, w in weights(c).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert missing == (["lm_head.weight"] if c["tie_word_embeddings"] else []), missing
    if c["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@torch.no_grad()
def full_forward(c, ids):
    """Every position's logits from one forward pass, `[len, vocab]`."""
    return model_of(c)(input_ids=torch.tensor([ids])).logits[0].numpy()


@torch.no_grad()
def cached_greedy(c, ids, n):
    """`generate(do_sample=False)`'s ids: the prompt in one pass, then one
    token per pass over the KV cache. Checked against generate itself."""
    model = model_of(c)
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    new = []
    for _ in range(n):
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    config = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    generated = model_of(c).generate(torch.tensor([ids]), generation_config=config)[0, len(ids):]
    assert generated.tolist() == new, (generated.tolist(), new)
    return new


def main():
    out = {"about": __doc__.strip().splitlines()[0], "script": "scripts/reference-families.py",
           "transformers": transformers.__version__, "torch": torch.__version__, "models": {}}
    for name, c in CONFIGS.items():
        cases = []
        for prompt in PROMPTS:
            logits = full_forward(c, prompt)
            greedy = cached_greedy(c, prompt, GREEDY)
            positions = [0, len(prompt) // 2, len(prompt) - 1]
            cases.append({"prompt": prompt, "positions": positions,
                          "logits": [logits[p].tolist() for p in positions],
                          "greedy": greedy})
            print(name, len(prompt), greedy)
        out["models"][name] = {"config": c, "cases": cases}
    with open("tests/data/family-reference.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
