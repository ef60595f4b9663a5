//! Weights that are a pure function of a tensor's name and an element's
//! index (shared/spec/deterministic-weights.md), so tests and benchmarks can
//! build a real model directory with no download and no committed weights,
//! and Hugging Face transformers can compute the same model for reference.

use super::config::Config;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Every tensor of a `config`, by Hugging Face name, with its shape.
pub fn tensor_shapes(config: &Config) -> BTreeMap<String, Vec<usize>> {
    let h = config.hidden_size;
    let hd = config.head_dim();
    let q = config.num_attention_heads * hd;
    let kv = config.num_kv_heads() * hd;
    let inter = config.intermediate_size;
    let mut shapes = BTreeMap::new();
    shapes.insert(
        "model.embed_tokens.weight".to_string(),
        vec![config.vocab_size, h],
    );
    shapes.insert("model.norm.weight".to_string(), vec![h]);
    // Tied embeddings (Llama 3.2 1B/3B, small Qwen2.5): the head is the table.
    if !config.tie_word_embeddings {
        shapes.insert("lm_head.weight".to_string(), vec![config.vocab_size, h]);
    }
    let biases = config.attention_biases();
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![inter, h]),
            ("mlp.up_proj.weight", vec![inter, h]),
            ("mlp.down_proj.weight", vec![h, inter]),
        ] {
            shapes.insert(format!("{p}.{name}"), shape);
        }
        for ((name, out), has) in [("q", q), ("k", kv), ("v", kv), ("o", h)]
            .into_iter()
            .zip(biases)
        {
            if has {
                shapes.insert(format!("{p}.self_attn.{name}_proj.bias"), vec![out]);
            }
        }
    }
    shapes
}

/// The values of tensor `name`, whose position in the byte-sorted list of
/// all names is `k`, with `len` elements.
pub fn tensor_values(name: &str, k: usize, len: usize) -> Vec<f32> {
    let is_norm = name.ends_with("layernorm.weight") || name == "model.norm.weight";
    let salt = (k as u32).wrapping_add(1).wrapping_mul(2_246_822_519);
    (0..len as u32)
        .map(|i| {
            let mut x = i.wrapping_mul(2_654_435_761).wrapping_add(salt);
            x ^= x >> 15;
            x = x.wrapping_mul(2_246_822_519);
            x ^= x >> 13;
            let r = (x >> 8) as i32 - 8_388_608;
            let v = r as f32 / 8_388_608.0;
            if is_norm { 1.0 + v * 0.1 } else { v * 0.2 }
        })
        .collect()
}

/// All tensors of `config` as little-endian f32 bytes, in name order.
pub fn tensors(config: &Config) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    tensor_shapes(config)
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let values = tensor_values(&name, k, shape.iter().product());
            (name, shape, values)
        })
        .collect()
}

/// A reward model's tensors (tests/reward-weights.md): the decoder's
/// tensors of `config` without `lm_head.weight`, plus `v_head.weight`
/// `[1, hidden]`, valued by the same formula over that list of names; the
/// decoder's names are then given under `prefix` (`model` keeps them).
pub fn reward_tensors(config: &Config, prefix: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut shapes = tensor_shapes(config);
    shapes.remove("lm_head.weight");
    shapes.insert("v_head.weight".to_string(), vec![1, config.hidden_size]);
    shapes
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let values = tensor_values(&name, k, shape.iter().product());
            let stored = match name.strip_prefix("model.") {
                Some(rest) => format!("{prefix}.{rest}"),
                None => name,
            };
            (stored, shape, values)
        })
        .collect()
}

/// Writes `model.safetensors` (f32) for `config` into `dir`.
pub fn write_safetensors(config: &Config, dir: &Path) -> Result<()> {
    save_f32(&tensors(config), &dir.join("model.safetensors"))
}

/// Writes named f32 tensors to a safetensors file.
pub fn save_f32(tensors: &[(String, Vec<usize>, Vec<f32>)], path: &Path) -> Result<()> {
    let bytes: Vec<(&str, &[usize], Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            (
                name.as_str(),
                shape.as_slice(),
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (name, shape, data) in &bytes {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), data)
                .with_context(|| format!("tensor {name}: shape and data disagree"))?;
        views.push((name.to_string(), view));
    }
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The shapes `--synthetic` knows by name (config.json fields).
pub fn shape(name: &str) -> Result<Config> {
    let json = match name {
        "mistral-7b" => {
            r#"{"architectures":["MistralForCausalLM"],"vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":32768,
            "sliding_window":4096,"rms_norm_eps":1e-5,"rope_theta":10000.0}"#
        }
        "llama-7b" => {
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"max_position_embeddings":4096,
            "rms_norm_eps":1e-5}"#
        }
        "tiny" => {
            r#"{"architectures":["MistralForCausalLM"],"vocab_size":32002,"hidden_size":64,"intermediate_size":160,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "max_position_embeddings":8192,"sliding_window":4096,"rms_norm_eps":1e-5}"#
        }
        path if std::path::Path::new(path).is_file() => {
            return Config::from_file(std::path::Path::new(path));
        }
        // Meant as a file: say what is wrong with it, not "unknown shape".
        path if path.ends_with(".json") || path.contains('/') => {
            let p = std::path::Path::new(path);
            match std::fs::metadata(p) {
                Ok(_) => anyhow::bail!("synthetic shape {path}: not a config.json file"),
                Err(e) => anyhow::bail!("synthetic shape {path}: {e}"),
            }
        }
        other => anyhow::bail!(
            "unknown synthetic shape {other:?} (mistral-7b, llama-7b, tiny, or a config.json path)"
        ),
    };
    Config::from_json(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_spec_formula() {
        // The first element of the first tensor by name (k = 0, i = 0):
        // x = 2246822519; x ^= x >> 15; x *= 2246822519; x ^= x >> 13.
        let mut x: u32 = 2_246_822_519;
        x ^= x >> 15;
        x = x.wrapping_mul(2_246_822_519);
        x ^= x >> 13;
        let expected = (((x >> 8) as i32 - 8_388_608) as f32 / 8_388_608.0) * 0.2;
        assert_eq!(tensor_values("lm_head.weight", 0, 1)[0], expected);
        let norm = tensor_values("model.norm.weight", 3, 4);
        assert!(norm.iter().all(|v| (0.9..=1.1).contains(v)));
    }
}
