//! `config.json` of a Mistral or Llama checkpoint, checked once at the edge so
//! the decoder can trust every dimension it is given.

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use std::path::Path;

/// The fields of a Hugging Face `config.json` that the decoder needs.
/// Unknown fields are ignored; missing optional ones take transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    /// Qwen2: whether `sliding_window` applies at all (transformers'
    /// default: no).
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Divisors of the rotary inverse frequencies, one per frequency, as a
    /// GGUF stores Llama 3.1's scaling (`rope_freqs.weight`, llama.cpp's
    /// `freq_factors`); never in a config.json.
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// The checkpoint's own dtype ("float32", "bfloat16", "float16"); newer
    /// transformers write `dtype`, older ones `torch_dtype`.
    #[serde(default, alias = "torch_dtype")]
    pub dtype: Option<String>,
}

/// `eos_token_id` is an integer in some configs and a list in others.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}

/// How rotary embeddings stretch to longer contexts, as transformers'
/// `modeling_rope_utils` computes each type's inverse frequencies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (inverse frequencies, equivalently).
    Linear {
        factor: f64,
    },
    /// Dynamic NTK (`_compute_dynamic_ntk_parameters`): beyond
    /// `max_position_embeddings` positions, the base grows with the length
    /// of the sequence, so the frequencies of a forward pass depend on how
    /// long the sequence is by its end. The context becomes
    /// `max_position_embeddings × factor`, as vLLM sets it.
    Dynamic {
        factor: f64,
        /// `max_position_embeddings`: below it, the default frequencies.
        original: usize,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept,
    /// those between interpolated (`_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Which decoder family the checkpoint belongs to. Mistral is Llama plus a
/// sliding attention window; Llama configs never carry a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Mistral,
    Llama,
    /// Qwen2 / Qwen2.5: Llama plus biases on the q, k and v projections.
    Qwen2,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let config: Config = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn family(&self) -> Result<Family> {
        let arch = |name: &str| self.architectures.iter().any(|a| a == name);
        let known =
            arch("MistralForCausalLM") || arch("LlamaForCausalLM") || arch("Qwen2ForCausalLM");
        if let Some(t) = self.model_type.as_deref()
            && known
            && !matches!(t, "mistral" | "llama" | "qwen2")
        {
            let shown: String = t.chars().take(64).collect();
            bail!(
                "model_type {shown:?} does not match architectures {:?} (mistral or llama)",
                self.architectures
            );
        }
        if arch("Qwen2ForCausalLM") || self.model_type.as_deref() == Some("qwen2") {
            Ok(Family::Qwen2)
        } else if arch("MistralForCausalLM") || self.model_type.as_deref() == Some("mistral") {
            Ok(Family::Mistral)
        } else if arch("LlamaForCausalLM")
            // The Starling reward models' configs (a Llama trunk with a value head).
            || arch("LLMForSequenceRegression")
            || arch("LlamaForSequenceClassification")
            || self.model_type.as_deref() == Some("llama")
        {
            Ok(Family::Llama)
        } else {
            bail!(
                "unsupported architecture {:?} (model_type {:?}): starling runs MistralForCausalLM, LlamaForCausalLM and Qwen2ForCausalLM",
                self.architectures,
                self.model_type
            )
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Which attention projections carry a bias, `[q, k, v, o]`: Qwen2's
    /// q, k and v always; Llama's all four with `attention_bias`.
    pub fn attention_biases(&self) -> [bool; 4] {
        match self.family() {
            Ok(Family::Qwen2) => [true, true, true, false],
            _ if self.attention_bias => [true; 4],
            _ => [false; 4],
        }
    }

    /// The attention window, only for Mistral (transformers' Llama has
    /// none). A window as long as the context hides nothing, so it is none:
    /// that also keeps `position + window` from overflowing.
    pub fn window(&self) -> Option<usize> {
        match self.family() {
            Ok(Family::Mistral) => self
                .sliding_window
                .filter(|&w| w < self.max_position_embeddings),
            _ => None,
        }
    }

    /// `rope_scaling`, checked: every number finite and in range, the type
    /// one the decoder computes.
    pub fn rope_scaling(&self) -> Result<RopeScaling> {
        let Some(scaling) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) else {
            return Ok(RopeScaling::None);
        };
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("?");
        let number = |key: &str| -> Result<f64> {
            let v = scaling
                .get(key)
                .and_then(|v| v.as_f64())
                .with_context(|| format!("rope_scaling of type {kind:?} needs a number {key}"))?;
            ensure!(
                v.is_finite() && (1e-6..1e6).contains(&v),
                "rope_scaling {key} is {}: expected a number from 1e-6 to 1e6",
                shown_number(v)
            );
            Ok(v)
        };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: number("factor")?,
            },
            "dynamic" => {
                let factor = number("factor")?;
                ensure!(
                    factor >= 1.0,
                    "rope_scaling of type \"dynamic\" needs a factor of at least 1, not {}",
                    shown_number(factor)
                );
                // The base's exponent is head_dim / (head_dim - 2).
                ensure!(
                    self.head_dim() > 2,
                    "rope_scaling of type \"dynamic\" needs a head_dim above 2"
                );
                let context = self.max_position_embeddings as f64 * factor;
                ensure!(
                    context <= MAX_CONTEXT as f64,
                    "max_position_embeddings × the dynamic rope_scaling factor is {context}, \
                     more than starling supports ({MAX_CONTEXT})"
                );
                RopeScaling::Dynamic {
                    factor,
                    original: self.max_position_embeddings,
                }
            }
            "llama3" => {
                let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                ensure!(
                    high > low,
                    "rope_scaling high_freq_factor ({high}) must be above low_freq_factor ({low})"
                );
                let original = number("original_max_position_embeddings")?;
                ensure!(
                    original.fract() == 0.0,
                    "rope_scaling original_max_position_embeddings must be a whole number"
                );
                RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original,
                }
            }
            other => bail!(
                "rope_scaling of type {} is not supported (default, linear, dynamic, llama3)",
                crate::weights::shown(other)
            ),
        })
    }

    /// Positions a sequence may hold: `max_position_embeddings`, or with
    /// dynamic RoPE scaling that times its factor (the point of the scaling).
    pub fn context_len(&self) -> Result<usize> {
        Ok(match self.rope_scaling()? {
            RopeScaling::Dynamic { factor, original } => (original as f64 * factor) as usize,
            _ => self.max_position_embeddings,
        })
    }

    fn validate(&self) -> Result<()> {
        self.family()?;
        // Every size is bounded before anything is allocated from it, and
        // the bounds keep every product of two sizes inside a usize.
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim.unwrap_or(0)),
        ] {
            ensure!(
                value <= MAX_SIZE,
                "{name} is {value}, more than starling supports ({MAX_SIZE})"
            );
        }
        ensure!(
            self.num_hidden_layers <= MAX_LAYERS,
            "num_hidden_layers is {}, more than starling supports ({MAX_LAYERS})",
            self.num_hidden_layers
        );
        ensure!(
            self.rope_theta.is_finite() && self.rope_theta > 0.0 && self.rope_theta < 1e30,
            "rope_theta must be a positive number below 1e30, not {}",
            shown_number(self.rope_theta)
        );
        ensure!(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0,
            "rms_norm_eps must be a number >= 0, not {}",
            shown_number(self.rms_norm_eps)
        );
        ensure!(
            (1..=MAX_CONTEXT).contains(&self.max_position_embeddings),
            "max_position_embeddings is {}, outside 1..={MAX_CONTEXT}",
            self.max_position_embeddings
        );
        ensure!(
            self.num_attention_heads > 0 && self.num_hidden_layers > 0 && self.hidden_size > 0,
            "num_attention_heads, num_hidden_layers and hidden_size must be positive"
        );
        ensure!(
            self.num_kv_heads() > 0 && self.num_attention_heads.is_multiple_of(self.num_kv_heads()),
            "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            self.num_attention_heads,
            self.num_kv_heads()
        );
        ensure!(
            self.head_dim.is_some() || self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size ({}) is not divisible by num_attention_heads ({}) and no head_dim is given",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            self.head_dim().is_multiple_of(2),
            "head_dim ({}) must be even for rotary embeddings",
            self.head_dim()
        );
        if let Some(act) = &self.hidden_act {
            ensure!(
                act == "silu",
                "hidden_act {act:?} is not supported (only silu)"
            );
        }
        ensure!(!self.mlp_bias, "MLP biases (mlp_bias) are not supported");
        // Qwen2 windows only some layers (max_window_layers): not computed here.
        ensure!(
            !(self.family()? == Family::Qwen2 && self.use_sliding_window),
            "use_sliding_window: true is not supported for Qwen2 (its window covers only some layers)"
        );
        self.rope_scaling()?;
        if let Some(w) = self.sliding_window {
            ensure!(w > 0, "sliding_window must be positive");
        }
        Ok(())
    }
}

/// A number from a config as an error shows it: 1e308 as `1e308`, not 309
/// digits (and 1e-320 as `1e-320`).
fn shown_number(v: f64) -> String {
    if v == 0.0 || (v.is_finite() && (1e-4..1e6).contains(&v.abs())) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// The largest dimension a config may give (vocabularies of 256k tokens and
/// hidden sizes of 16k are real; this leaves room and keeps products small).
const MAX_SIZE: usize = 1 << 24;
const MAX_LAYERS: usize = 1 << 12;
/// The longest context (Qwen2.5-1M's 1,010,000 fits).
const MAX_CONTEXT: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    const MISTRAL: &str = r#"{"architectures":["MistralForCausalLM"],"vocab_size":32002,
        "hidden_size":64,"intermediate_size":160,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"head_dim":16,"sliding_window":4096,"eos_token_id":32000,
        "max_position_embeddings":8192}"#;

    #[test]
    fn reads_a_mistral_config() {
        let c = Config::from_json(MISTRAL).unwrap();
        assert_eq!(c.family().unwrap(), Family::Mistral);
        assert_eq!(c.num_kv_heads(), 2);
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.window(), Some(4096));
        assert_eq!(c.eos_token_id, Some(TokenIds::One(32000)));
    }

    #[test]
    fn a_window_no_shorter_than_the_context_is_none() {
        let long = MISTRAL.replace(
            "\"sliding_window\":4096",
            "\"sliding_window\":18446744073709551615",
        );
        assert_eq!(Config::from_json(&long).unwrap().window(), None);
        assert_eq!(Config::from_json(MISTRAL).unwrap().window(), Some(4096));
        let equal = MISTRAL.replace("8192", "4096");
        assert_eq!(Config::from_json(&equal).unwrap().window(), None);
    }

    #[test]
    fn llama_ignores_a_window() {
        let text = MISTRAL.replace("MistralForCausalLM", "LlamaForCausalLM");
        let c = Config::from_json(&text).unwrap();
        assert_eq!(c.family().unwrap(), Family::Llama);
        assert_eq!(c.window(), None);
    }

    #[test]
    fn rejects_sizes_that_would_allocate_without_bound() {
        for (field, value) in [
            ("vocab_size", "32002", "18446744073709551615"),
            ("hidden_size", "64", "4294967296"),
            ("num_hidden_layers", "2", "100000"),
        ]
        .map(|(f, old, new)| (f, (old, new)))
        {
            let bad = MISTRAL.replace(
                &format!("\"{field}\":{}", value.0),
                &format!("\"{field}\":{}", value.1),
            );
            assert_ne!(bad, MISTRAL);
            let err = Config::from_json(&bad).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let huge_context = MISTRAL.replace(
            "\"vocab_size\"",
            "\"max_position_embeddings\":1099511627776,\"vocab_size\"",
        );
        let err = Config::from_json(&huge_context).unwrap_err().to_string();
        assert!(err.contains("max_position_embeddings"), "{err}");
    }

    #[test]
    fn rejects_bad_head_counts_and_other_architectures() {
        let bad = MISTRAL.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        let err = Config::from_json(&bad).unwrap_err().to_string();
        assert!(err.contains("multiple of num_key_value_heads"), "{err}");
        let other = MISTRAL.replace("MistralForCausalLM", "GPT2LMHeadModel");
        assert!(Config::from_json(&other).is_err());
    }
}
