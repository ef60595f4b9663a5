#!/usr/bin/env python3
"""Writes tests/data/family-reference.json: logits and greedy ids of a tiny
Llama 3 model (rope_scaling llama3, tied embeddings, GQA), a tiny linear-
scaled Llama and a tiny Qwen2 model (q/k/v biases, tied embeddings), on the
weights of tests/family-weights.md.

torch from PyPI pulls gigabytes of CUDA wheels, so this is a float64 numpy
re-implementation of transformers' code, line by line: the rotary inverse
frequencies of `modeling_rope_utils` (`_compute_default_rope_parameters`,
`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`, in
float32 as there), and the forward of `LlamaModel` / `Qwen2Model` (eager
attention, causal mask, `repeat_kv`, `rotate_half`). Greedy ids re-run the
whole sequence each step (no cache), as the reference for starling's cached
loop.

Run by hand (not in CI):  pip install numpy && python scripts/reference-families.py
"""
import json, math
import numpy as np

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
    "tiny-qwen2": dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                       rope_theta=1000000.0, tie_word_embeddings=True,
                       use_sliding_window=False, sliding_window=32),
}
PROMPTS = [
    [1, 17, 300, 42, 99, 511, 7, 260, 13, 13, 480, 5],
    [1] + [(i * 37 + 11) % 512 for i in range(80)],  # beyond the 64 original positions
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


def inv_freq(c):
    """modeling_rope_utils, in float32 as there."""
    dim, base = c["head_dim"], c["rope_theta"]
    f = (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)))).astype(np.float32)
    s = c.get("rope_scaling") or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "linear":
        f = (f / np.float32(s["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor, low, high = np.float32(s["factor"]), np.float32(s["low_freq_factor"]), np.float32(s["high_freq_factor"])
        old = np.float32(s["original_max_position_embeddings"])
        low_freq_wavelen = old / low
        high_freq_wavelen = old / high
        wavelen = np.float32(2 * math.pi) / f
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, f / factor, f).astype(np.float32)
        smooth_factor = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama).astype(np.float32)
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        f = np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)
    return f


def forward(c, w, ids):
    """LlamaModel / Qwen2Model forward + lm_head (tied: the embedding)."""
    n, hd = len(ids), c["head_dim"]
    heads, kvh = c["num_attention_heads"], c["num_key_value_heads"]
    # LlamaRotaryEmbedding: freqs = (inv_freq @ position_ids) in float32, cos/sin in float32.
    freqs = (np.arange(n, dtype=np.float32)[:, None] * inv_freq(c)[None, :]).astype(np.float32)
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb).astype(np.float64), np.sin(emb).astype(np.float64)

    def rotate_half(x):
        return np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)

    def rms(x, weight):
        return weight * (x / np.sqrt((x * x).mean(-1, keepdims=True) + c["rms_norm_eps"]))

    def proj(h, p, name):
        y = h @ w[p + f"self_attn.{name}_proj.weight"].T
        b = w.get(p + f"self_attn.{name}_proj.bias")
        return y + b if b is not None else y

    causal = np.tril(np.ones((n, n), dtype=bool))
    x = w["model.embed_tokens.weight"][np.asarray(ids)]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = proj(h, p, "q").reshape(n, heads, hd).transpose(1, 0, 2)
        k = proj(h, p, "k").reshape(n, kvh, hd).transpose(1, 0, 2)
        v = proj(h, p, "v").reshape(n, kvh, hd).transpose(1, 0, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = np.empty((heads, n, hd))
        for head in range(heads):
            kv = head // (heads // kvh)
            scores = (q[head] @ k[kv].T) / math.sqrt(hd)
            scores = np.where(causal, scores, -np.inf)
            scores -= scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            out[head] = probs @ v[kv]
        x = x + proj(out.transpose(1, 0, 2).reshape(n, heads * hd), p, "o")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def main():
    out = {"about": __doc__.strip().splitlines()[0], "script": "scripts/reference-families.py",
           "numpy": np.__version__, "models": {}}
    for name, c in CONFIGS.items():
        w = weights(c)
        cases = []
        for prompt in PROMPTS:
            logits = forward(c, w, prompt)
            ids = list(prompt)
            for _ in range(GREEDY):
                ids.append(int(np.argmax(forward(c, w, ids)[-1])))
            positions = [0, len(prompt) // 2, len(prompt) - 1]
            cases.append({"prompt": prompt, "positions": positions,
                          "logits": [logits[p].tolist() for p in positions],
                          "greedy": ids[len(prompt):]})
            print(name, len(prompt), ids[len(prompt):])
        out["models"][name] = {"config": c, "cases": cases}
    with open("tests/data/family-reference.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
