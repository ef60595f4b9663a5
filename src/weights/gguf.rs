//! GGUF files (llama.cpp's format): the weights, in ggml's quantized block
//! formats, and everything else a run needs in the metadata — the config,
//! the SentencePiece vocabulary, the chat template.
//!
//! `gguf_header` parses the container; this module maps it to the Hugging
//! Face names the decoder uses, and hands out each tensor's bytes as a
//! slice of the file's memory map (nothing is read or copied at start: the
//! weights are the page cache's pages). The one subtlety: llama.cpp's
//! converter permutes the rows of `q_proj` and `k_proj` so its rope can
//! rotate adjacent pairs. The model runs them as stored, with rope on
//! adjacent pairs (`RopeLayout::AdjacentPairs`); only a conversion to
//! another format (`starling quantize`) puts them back in the Hugging Face
//! order (`Rows::HuggingFace`), and writing permutes them again. Rows are
//! whole blocks in every ggml format, so this is a byte shuffle that works
//! on quantized data unchanged.

use crate::model::Config;
use crate::tokenizer::Vocab;
use crate::tokenizer::bpe::BpeVocab;
use crate::tokenizer::sentencepiece::{Piece, PieceKind, SpmVocab};
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

pub struct Gguf {
    path: PathBuf,
    content: Content,
    /// The whole file, memory-mapped read-only.
    map: Bytes,
    /// The same map, followed without being kept alive (`resident`).
    followed: std::sync::Weak<memmap2::Mmap>,
    config: Config,
}

/// The row order a `q_proj`/`k_proj` tensor is wanted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// As the file stores them (llama.cpp's: rope pairs adjacent).
    AsStored,
    /// The Hugging Face order (rope pairs a head's two halves).
    HuggingFace,
}

/// Llama 3.1's RoPE scaling as llama.cpp stores it: a divisor per frequency.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The GGUF name of a Hugging Face Llama/Mistral tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (rest, kind) = match rest.strip_suffix(".weight") {
        Some(r) => (r, "weight"),
        None => (rest.strip_suffix(".bias")?, "bias"),
    };
    let part = match (rest, kind) {
        ("input_layernorm", "weight") => "attn_norm",
        ("self_attn.q_proj", _) => "attn_q",
        ("self_attn.k_proj", _) => "attn_k",
        ("self_attn.v_proj", _) => "attn_v",
        ("self_attn.o_proj", _) => "attn_output",
        ("post_attention_layernorm", "weight") => "ffn_norm",
        ("mlp.gate_proj", "weight") => "ffn_gate",
        ("mlp.up_proj", "weight") => "ffn_up",
        ("mlp.down_proj", "weight") => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.{kind}"))
}

/// The number of rope heads whose rows llama.cpp permutes in tensor `hf`.
pub fn permuted_heads(hf: &str, config: &Config) -> Option<usize> {
    // llama.cpp's converter permutes only the `llama` architecture's rows;
    // Qwen2 keeps transformers' order (its rope is NEOX: halves).
    if uses_halves(config) {
        return None;
    }
    if hf.ends_with("self_attn.q_proj.weight") {
        Some(config.num_attention_heads)
    } else if hf.ends_with("self_attn.k_proj.weight") {
        Some(config.num_kv_heads())
    } else {
        None
    }
}

/// Whether the GGUF keeps q/k rows in transformers' order (rope on halves),
/// as llama.cpp does for Qwen2.
pub fn uses_halves(config: &Config) -> bool {
    matches!(config.family(), Ok(crate::model::Family::Qwen2))
}

/// llama.cpp's architecture name for a config.
pub fn arch_name(config: &Config) -> &'static str {
    if uses_halves(config) {
        "qwen2"
    } else {
        "llama"
    }
}

/// Reorders the rows of a `[heads * head_dim, ..]` matrix stored as
/// `row_bytes`-byte rows between the Hugging Face order (within a head: all
/// first halves, then all second halves) and llama.cpp's (pairs adjacent):
/// GGUF row `2j + t` of a head is Hugging Face row `t * head_dim/2 + j`.
pub fn permute_rows(data: &[u8], row_bytes: usize, heads: usize, to_gguf: bool) -> Vec<u8> {
    let rows = data.len() / row_bytes;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..half {
            for t in 0..2 {
                let gguf = h * hd + 2 * j + t;
                let hf = h * hd + t * half + j;
                let (from, to) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&data[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    out
}

/// candle attaches a backtrace to its errors when RUST_BACKTRACE is set;
/// a user-facing message is the one line inside.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => *inner,
        e => e,
    }
}

pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Whether the regular file at `path` starts with GGUF's magic bytes.
pub fn has_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// A string from the metadata: `None` when absent, an error naming the file
/// when it holds another type (never read as "").
fn meta_string<'a>(value: Option<&'a Value>, key: &str, path: &Path) -> Result<Option<&'a str>> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => bail!(
            "{}: metadata {key} is a {:?}, not a string",
            path.display(),
            other.value_type()
        ),
    }
}

/// Typed reads of the metadata, naming the file in every error.
struct Meta<'a> {
    content: &'a Content,
    arch: &'a str,
    path: &'a Path,
}

impl Meta<'_> {
    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn arch_u64(&self, key: &str) -> Result<Option<u64>> {
        let full = format!("{}.{key}", self.arch);
        self.meta(&full)
            .map(|v| v.to_u64().or_else(|_| v.to_u32().map(u64::from)))
            .transpose()
            .map_err(|_| {
                anyhow::anyhow!(
                    "{}: metadata {full} is not an unsigned integer",
                    self.path.display()
                )
            })
    }

    fn required(&self, key: &str) -> Result<u64> {
        self.arch_u64(key)?.with_context(|| {
            format!(
                "{}: metadata {}.{key} is missing",
                self.path.display(),
                self.arch
            )
        })
    }

    /// A float from the metadata (f32 as llama.cpp writes it, or f64);
    /// another type, NaN or an infinity is an error, never the default.
    fn arch_f32(&self, key: &str) -> Result<Option<f32>> {
        let full = format!("{}.{key}", self.arch);
        let x = match self.meta(&full) {
            None => return Ok(None),
            Some(Value::F32(x)) => *x,
            Some(Value::F64(x)) => *x as f32,
            Some(other) => bail!(
                "{}: metadata {full} is a {:?}, not a float",
                self.path.display(),
                other.value_type()
            ),
        };
        if !x.is_finite() {
            bail!(
                "{}: metadata {full} is {x}, not a finite number",
                self.path.display()
            );
        }
        Ok(Some(x))
    }

    /// A token id from the metadata: absent, or a u32 (an id of another
    /// type, like -1, is an error rather than silently no BOS).
    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        let id = |v: &Value| -> Option<u32> {
            let n: i128 = match *v {
                Value::U8(x) => x.into(),
                Value::U16(x) => x.into(),
                Value::U32(x) => x.into(),
                Value::U64(x) => x.into(),
                Value::I8(x) => x.into(),
                Value::I16(x) => x.into(),
                Value::I32(x) => x.into(),
                Value::I64(x) => x.into(),
                _ => return None,
            };
            u32::try_from(n).ok()
        };
        self.meta(key)
            .map(|v| {
                id(v).ok_or_else(|| {
                    anyhow::anyhow!("{}: metadata {key} is not a token id", self.path.display())
                })
            })
            .transpose()
    }

    fn config(&self) -> Result<Config> {
        let vocab = match self.arch_u64("vocab_size")? {
            Some(v) => v as usize,
            None => match self.content.tensor_infos.get("token_embd.weight") {
                Some(info) => match info.shape.dims() {
                    [vocab, _] => *vocab,
                    dims => bail!(
                        "{}: token_embd.weight has shape {dims:?}, not [vocab, hidden]",
                        self.path.display()
                    ),
                },
                None => bail!("{}: has no token_embd.weight", self.path.display()),
            },
        };
        let heads = self.required("attention.head_count")?;
        let architecture = match self.arch {
            "qwen2" => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let mut json = serde_json::json!({
            "architectures": [architecture],
            "vocab_size": vocab,
            "hidden_size": self.required("embedding_length")?,
            "intermediate_size": self.required("feed_forward_length")?,
            "num_hidden_layers": self.required("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.arch_u64("attention.head_count_kv")?.unwrap_or(heads),
            "max_position_embeddings": self.arch_u64("context_length")?.unwrap_or(4096),
            "rms_norm_eps": self.arch_f32("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            "rope_theta": self.arch_f32("rope.freq_base")?.unwrap_or(10_000.0),
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
        });
        if let Some(hd) = self.arch_u64("attention.key_length")? {
            json["head_dim"] = hd.into();
        }
        // llama.cpp rotates the first `rope.dimension_count` dimensions of
        // each head; the decoder rotates all of them.
        if let Some(rotated) = self.arch_u64("rope.dimension_count")? {
            let hidden = self.required("embedding_length")?;
            let head = match self.arch_u64("attention.key_length")? {
                Some(hd) => hd,
                None => hidden / heads.max(1),
            };
            if rotated != head {
                bail!(
                    "{}: metadata {}.rope.dimension_count is {rotated}, but heads are {head} wide: partial rotary embeddings are not supported",
                    self.path.display(),
                    self.arch
                );
            }
        }
        if let Some(w) = self.arch_u64("attention.sliding_window")? {
            json["sliding_window"] = w.into();
        }
        // RoPE scaling, as llama.cpp stores it: a type, or (Llama 3.1) a
        // tensor of per-frequency factors. The config refuses what the
        // decoder does not compute.
        let kind_key = format!("{}.rope.scaling.type", self.arch);
        let scaling = match self.content.metadata.get(&kind_key) {
            None => None,
            Some(Value::String(t)) => Some(t).filter(|t| t.as_str() != "none"),
            Some(other) => bail!(
                "{}: metadata {kind_key} is a {:?}, not a string",
                self.path.display(),
                other.value_type()
            ),
        };
        if let Some(kind) = scaling {
            json["rope_scaling"] = serde_json::json!({ "type": kind });
            if let Some(f) = self.arch_f32("rope.scaling.factor")? {
                json["rope_scaling"]["factor"] = f64::from(f).into();
            }
        }
        if let Some(bos) = self.token_id("tokenizer.ggml.bos_token_id")? {
            json["bos_token_id"] = bos.into();
        }
        if let Some(eos) = self.token_id("tokenizer.ggml.eos_token_id")? {
            json["eos_token_id"] = eos.into();
        }
        Config::from_json(&json.to_string()).with_context(|| {
            format!(
                "{}: the metadata describes no valid model",
                self.path.display()
            )
        })
    }
}

/// The vocabulary of a GGUF file, whatever its architecture or tensors
/// (llama.cpp's vocabulary-only test files; `starling tokenize`).
pub fn read_vocab(path: &Path) -> Result<Vocab> {
    let (_, content) = read_header(path)?;
    let bos = content
        .metadata
        .get("tokenizer.ggml.bos_token_id")
        .and_then(|v| v.to_u32().ok());
    let mut config: Config = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1, "hidden_size": 1,
        "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1
    }))?;
    config.bos_token_id = bos;
    let gguf = Gguf {
        path: path.to_path_buf(),
        content,
        map: Bytes::new(),
        followed: std::sync::Weak::new(),
        config,
    };
    gguf.tokenizer_vocab()
}

/// The open file and its checked header.
fn read_header(path: &Path) -> Result<(std::fs::File, Content)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    let content = super::gguf_header::read(&file, size)
        .map_err(|e| anyhow::anyhow!("{}: not a valid GGUF file: {e}", path.display()))?;
    Ok((file, content))
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let (file, content) = read_header(path)?;
        let key = "general.architecture";
        let arch = meta_string(content.metadata.get(key), key, path)?
            .with_context(|| format!("{}: metadata {key} is missing", path.display()))?
            .to_string();
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            bail!(
                "{}: architecture {} is not supported (llama, mistral or qwen2)",
                path.display(),
                super::shown(&arch)
            );
        }
        let config = Meta {
            content: &content,
            arch: &arch,
            path,
        }
        .config()?;
        // SAFETY: mapped read-only; like every mmap-based loader (llama.cpp,
        // candle, safetensors) this assumes nobody truncates or rewrites the
        // file while the model runs. A truncation at least ends the run in
        // one line (`share` watches the map: `bus_error`), not a crash.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {} into memory", path.display()))?;
        let (map, followed) = super::resident::share(map, path);
        let mut gguf = Self {
            path: path.to_path_buf(),
            content,
            map,
            followed,
            config,
        };
        if gguf.content.tensor_infos.contains_key(ROPE_FREQS) {
            gguf.config.rope_freq_factors = Some(gguf.rope_freq_factors()?);
        }
        Ok(gguf)
    }

    /// `rope_freqs.weight`: f32, one positive finite divisor per rotary
    /// frequency (`head_dim / 2` of them).
    fn rope_freq_factors(&self) -> Result<Vec<f32>> {
        let path = self.path.display();
        let info = &self.content.tensor_infos[ROPE_FREQS];
        let half = self.config.head_dim() / 2;
        if info.ggml_dtype != GgmlDType::F32 || info.shape.dims() != [half] {
            bail!(
                "{path}: {ROPE_FREQS} is {:?} of shape {:?}, expected F32 of [{half}]",
                info.ggml_dtype,
                info.shape.dims()
            );
        }
        let start = usize::try_from(self.content.tensor_data_offset + info.offset)
            .context("tensor offset overflows")?;
        let bytes = self
            .map
            .get(start..start + 4 * half)
            .with_context(|| format!("{path}: {ROPE_FREQS} lies past the end of the file"))?;
        let factors: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            bail!("{path}: {ROPE_FREQS} holds {bad}, not a positive finite factor");
        }
        Ok(factors)
    }

    /// The map, for `resident`'s move.
    pub(crate) fn followed(&self) -> std::sync::Weak<memmap2::Mmap> {
        self.followed.clone()
    }

    /// The whole file as mapped.
    #[cfg(test)]
    pub(crate) fn mapped(&self) -> &Bytes {
        &self.map
    }

    /// The model's dimensions, in `config.json` terms.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// The SentencePiece vocabulary of `tokenizer.ggml.*`.
    pub fn vocab(&self) -> Result<SpmVocab> {
        let key = "tokenizer.ggml.model";
        let model = meta_string(self.meta(key), key, &self.path)?
            .with_context(|| format!("{}: metadata {key} is missing", self.path.display()))?;
        let path = self.path.display();
        if model != "llama" {
            bail!(
                "{path}: tokenizer {} is not supported (SentencePiece \"llama\" and byte-level BPE \"gpt2\")",
                super::shown(model)
            );
        }
        let list = |key: &str| -> Result<&Vec<Value>> {
            self.meta(key)
                .with_context(|| format!("{path}: metadata {key} is missing"))?
                .to_vec()
                .map_err(|_| anyhow::anyhow!("{path}: metadata {key} is not an array"))
        };
        let tokens = list("tokenizer.ggml.tokens")?;
        let scores = self.scores(tokens.len())?;
        let types = self.token_types(tokens.len())?;
        let mut pieces = Vec::with_capacity(tokens.len());
        for (i, token) in tokens.iter().enumerate() {
            let text = token
                .to_string()
                .map_err(|_| anyhow::anyhow!("{path}: token {i} is not a string"))?
                .clone();
            let score = scores.as_ref().map_or(0.0, |s| s[i]);
            let kind = PieceKind::from_proto(types.as_ref().map(|t| t[i]));
            pieces.push(Piece { text, score, kind });
        }
        let add_dummy_prefix = self
            .meta("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true);
        Ok(SpmVocab {
            pieces,
            add_dummy_prefix,
        })
    }

    /// The vocabulary of `tokenizer.ggml.*`: SentencePiece (`llama`) or
    /// byte-level BPE (`gpt2`, with `tokenizer.ggml.pre` naming its
    /// pre-tokenizer family).
    pub fn tokenizer_vocab(&self) -> Result<Vocab> {
        match self.tokenizer_model() {
            "gpt2" => Ok(Vocab::Bpe(self.bpe_vocab()?)),
            _ => Ok(Vocab::SentencePiece(self.vocab()?)),
        }
    }

    fn tokenizer_model(&self) -> &str {
        self.meta("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("")
    }

    /// The byte-level BPE vocabulary of `tokenizer.ggml.*`.
    pub fn bpe_vocab(&self) -> Result<BpeVocab> {
        let path = self.path.display();
        let strings = |key: &str| -> Result<Vec<String>> {
            let list = self
                .meta(key)
                .with_context(|| format!("{path}: metadata {key} is missing"))?
                .to_vec()
                .map_err(|_| anyhow::anyhow!("{path}: metadata {key} is not an array"))?;
            list.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.to_string()
                        .cloned()
                        .map_err(|_| anyhow::anyhow!("{path}: {key}[{i}] is not a string"))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types = self.token_types(tokens.len())?;
        // Unused by byte-level BPE (merges rank the pairs), but checked as
        // every number in the file is.
        self.scores(tokens.len())?;
        let kinds = (0..tokens.len())
            .map(|i| PieceKind::from_proto(types.as_ref().map(|t| t[i])))
            .collect();
        let pre_name = self
            .meta("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let pre = crate::tokenizer::bpe::pre_tokenizer(pre_name.as_deref())
            .with_context(|| path.to_string())?;
        let add_bos = self
            .meta("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(pre.add_bos);
        Ok(BpeVocab {
            tokens,
            kinds,
            merges,
            pre,
            pre_name: pre_name.unwrap_or_else(|| "gpt-2".into()),
            bos: self.config.bos_token_id,
            add_bos,
        })
    }

    /// `tokenizer.ggml.token_type`, when present: one of llama.cpp's types
    /// (0 undefined, 1 normal, 2 unknown, 3 control, 4 user-defined, 5
    /// unused, 6 byte) per token.
    fn token_types(&self, n: usize) -> Result<Option<Vec<i32>>> {
        self.per_token(
            "tokenizer.ggml.token_type",
            n,
            "a token type from 0 to 6",
            |v| v.to_i32().ok().filter(|t| (0..=6).contains(t)),
        )
    }

    /// `tokenizer.ggml.scores`, when present: a finite f32 per token.
    fn scores(&self, n: usize) -> Result<Option<Vec<f32>>> {
        self.per_token("tokenizer.ggml.scores", n, "a finite 32-bit float", |v| {
            v.to_f32().ok().filter(|s| s.is_finite())
        })
    }

    /// An optional per-token array (`key`): absent is `None`, as llama.cpp
    /// takes it; present, it must hold `n` entries that `read` accepts.
    fn per_token<T>(
        &self,
        key: &str,
        n: usize,
        what: &str,
        read: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let path = self.path.display();
        let Some(value) = self.meta(key) else {
            return Ok(None);
        };
        let values = value
            .to_vec()
            .map_err(|_| anyhow::anyhow!("{path}: metadata {key} is not an array"))?;
        ensure!(
            values.len() == n,
            "{path}: metadata {key} has {} entries for {n} tokens",
            values.len()
        );
        values
            .iter()
            .enumerate()
            .map(|(i, v)| read(v).with_context(|| format!("{path}: {key}[{i}] is not {what}")))
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }

    /// `tokenizer.ggml.eot_token_id` and `eom_token_id`: end of turn and
    /// end of message (Llama 3.1's `<|eom_id|>`), which also end an answer.
    pub fn end_of_turn_ids(&self) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            let meta = Meta {
                content: &self.content,
                arch: "",
                path: &self.path,
            };
            ids.extend(meta.token_id(key)?);
        }
        Ok(ids)
    }

    pub fn chat_template(&self) -> Option<String> {
        self.meta("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned()
    }

    /// The GGUF type a Hugging Face-named tensor is stored in.
    pub fn stored_type(&self, hf: &str) -> Option<GgmlDType> {
        let name = gguf_name(hf)?;
        self.content.tensor_infos.get(&name).map(|i| i.ggml_dtype)
    }

    pub fn contains(&self, hf: &str) -> bool {
        self.stored_type(hf).is_some()
    }

    /// The stored bytes of tensor `hf` (a Hugging Face name) and their
    /// format, checked against `shape`: a slice of the memory map, no copy,
    /// rows as stored (`Rows::AsStored`).
    pub fn tensor_data(&self, hf: &str, shape: &[usize]) -> Result<(GgmlDType, Bytes)> {
        let name = gguf_name(hf).with_context(|| format!("no GGUF name for tensor {hf}"))?;
        let info =
            self.content.tensor_infos.get(&name).with_context(|| {
                format!("tensor {name} is missing from {}", self.path.display())
            })?;
        if info.shape.dims() != shape {
            bail!(
                "tensor {name} in {} has shape {:?}, expected {shape:?} from the metadata",
                self.path.display(),
                info.shape.dims()
            );
        }
        let dtype = info.ggml_dtype;
        // The header reader checked that the rows are whole blocks and that
        // the bytes lie inside the file; the map is checked again in case the
        // file shrank since.
        let bytes = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let start = usize::try_from(self.content.tensor_data_offset + info.offset)
            .context("tensor offset overflows")?;
        let end = start.checked_add(bytes).context("tensor size overflows")?;
        if end > self.map.len() {
            bail!(
                "tensor {name} lies past the end of {} (truncated file?)",
                self.path.display()
            );
        }
        let data = self.map.slice(start..end);
        check_block_scales(dtype, &data)
            .with_context(|| format!("tensor {name} in {}", self.path.display()))?;
        Ok((dtype, data))
    }

    /// Tensor `hf` (a Hugging Face name) in its stored format, as a candle
    /// `QTensor` on `device` (a copy), checked against `shape`, its q/k rows
    /// in the order `rows` asks for.
    pub fn tensor(
        &self,
        hf: &str,
        shape: &[usize],
        device: &Device,
        rows: Rows,
    ) -> Result<QTensor> {
        let (dtype, data) = self.tensor_data(hf, shape)?;
        let data = match permuted_heads(hf, &self.config) {
            Some(heads) if rows == Rows::HuggingFace => {
                Bytes::from(permute_rows(&data, data.len() / shape[0], heads, false))
            }
            _ => data,
        };
        candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &data, shape.to_vec(), device)
            .map_err(without_backtrace)
            .with_context(|| format!("loading tensor {hf} from {}", self.path.display()))
    }
}

/// What `write` puts in a GGUF file besides the tensors.
pub struct GgufHeader<'a> {
    pub name: &'a str,
    pub config: &'a Config,
    pub vocab: &'a Vocab,
    pub chat_template: Option<&'a str>,
    /// llama.cpp's `general.file_type` (its LLAMA_FTYPE number).
    pub file_type: u32,
}

/// `tokenizer.ggml.*` of a SentencePiece vocabulary, as llama.cpp's
/// converter writes it.
fn spm_metadata(meta: &mut Vec<(String, Value)>, vocab: &SpmVocab, config: &Config) {
    let u32v = |v: usize| Value::U32(v as u32);
    let pieces = &vocab.pieces;
    meta.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
    meta.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(
            pieces
                .iter()
                .map(|p| Value::String(p.text.clone()))
                .collect(),
        ),
    ));
    meta.push((
        "tokenizer.ggml.scores".into(),
        Value::Array(pieces.iter().map(|p| Value::F32(p.score)).collect()),
    ));
    meta.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(
            pieces
                .iter()
                .map(|p| Value::I32(p.kind.to_proto()))
                .collect(),
        ),
    ));
    meta.push((
        "tokenizer.ggml.add_space_prefix".into(),
        Value::Bool(vocab.add_dummy_prefix),
    ));
    let find = |text: &str| pieces.iter().position(|p| p.text == text);
    let bos = config
        .bos_token_id
        .map(|b| b as usize)
        .or_else(|| find("<s>"));
    let eos = config
        .eos_token_id
        .as_ref()
        .and_then(|e| e.to_vec().first().map(|&e| e as usize))
        .or_else(|| find("</s>"));
    if let Some(bos) = bos {
        meta.push(("tokenizer.ggml.bos_token_id".into(), u32v(bos)));
        meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)));
    }
    if let Some(eos) = eos {
        meta.push(("tokenizer.ggml.eos_token_id".into(), u32v(eos)));
        meta.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    }
    if let Some(unk) = pieces.iter().position(|p| p.kind == PieceKind::Unknown) {
        meta.push(("tokenizer.ggml.unknown_token_id".into(), u32v(unk)));
    }
}

/// `tokenizer.ggml.*` of a byte-level BPE vocabulary (`gpt2`), as llama.cpp's
/// converter writes it: tokens, types, merges and the pre-tokenizer's name.
fn bpe_metadata(meta: &mut Vec<(String, Value)>, vocab: &BpeVocab, config: &Config) {
    let u32v = |v: u32| Value::U32(v);
    meta.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    meta.push((
        "tokenizer.ggml.pre".into(),
        Value::String(vocab.pre_name.clone()),
    ));
    meta.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(
            vocab
                .tokens
                .iter()
                .map(|t| Value::String(t.clone()))
                .collect(),
        ),
    ));
    meta.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(
            vocab
                .kinds
                .iter()
                .map(|k| Value::I32(k.to_proto()))
                .collect(),
        ),
    ));
    meta.push((
        "tokenizer.ggml.merges".into(),
        Value::Array(
            vocab
                .merges
                .iter()
                .map(|m| Value::String(m.clone()))
                .collect(),
        ),
    ));
    if let Some(bos) = config.bos_token_id.or(vocab.bos) {
        meta.push(("tokenizer.ggml.bos_token_id".into(), u32v(bos)));
    }
    meta.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(vocab.add_bos),
    ));
    if let Some(eos) = config
        .eos_token_id
        .as_ref()
        .and_then(|e| e.to_vec().first().copied())
    {
        meta.push(("tokenizer.ggml.eos_token_id".into(), u32v(eos)));
    }
    // End of turn and of message, as llama.cpp names them (it also finds
    // them by text when they are missing).
    let find = |text: &str| vocab.tokens.iter().position(|t| t == text);
    if let Some(eot) = find("<|eot_id|>").or_else(|| find("<|im_end|>")) {
        meta.push(("tokenizer.ggml.eot_token_id".into(), u32v(eot as u32)));
    }
    if let Some(eom) = find("<|eom_id|>") {
        meta.push(("tokenizer.ggml.eom_token_id".into(), u32v(eom as u32)));
    }
}

/// llama.cpp's `general.file_type` for a file whose matrices are `dtype`.
pub fn file_type(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q4K => 15, // Q4_K_M: Q4_K matrices with a Q6_K output
        GgmlDType::Q5K => 17, // Q5_K_M
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        _ => 0,
    }
}

/// Writes a llama.cpp-compatible GGUF (architecture `llama`): metadata in
/// llama.cpp's keys, tensors under its names, q/k rows permuted for its
/// rope. `tensors` are Hugging Face-named, in the Hugging Face layout.
/// Written to a temporary name and renamed, so a failed run leaves no
/// half-written model behind.
pub fn write(path: &Path, header: &GgufHeader, tensors: Vec<(String, QTensor)>) -> Result<()> {
    let config = header.config;
    let name = arch_name(config);
    let arch = |k: &str| format!("{name}.{k}");
    let u32v = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(name.into())),
        ("general.name".into(), Value::String(header.name.into())),
        ("general.file_type".into(), Value::U32(header.file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
        (arch("vocab_size"), u32v(config.vocab_size)),
        (arch("context_length"), u32v(config.max_position_embeddings)),
        (arch("embedding_length"), u32v(config.hidden_size)),
        (arch("block_count"), u32v(config.num_hidden_layers)),
        (arch("feed_forward_length"), u32v(config.intermediate_size)),
        (arch("rope.dimension_count"), u32v(config.head_dim())),
        (
            arch("attention.head_count"),
            u32v(config.num_attention_heads),
        ),
        (arch("attention.head_count_kv"), u32v(config.num_kv_heads())),
        (arch("attention.key_length"), u32v(config.head_dim())),
        (arch("attention.value_length"), u32v(config.head_dim())),
        (
            arch("attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (arch("rope.freq_base"), Value::F32(config.rope_theta as f32)),
    ];
    if let Some(w) = config.window() {
        meta.push((arch("attention.sliding_window"), u32v(w)));
    }
    if let crate::model::config::RopeScaling::Linear { factor } = config.rope_scaling()? {
        meta.push((arch("rope.scaling.type"), Value::String("linear".into())));
        meta.push((arch("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    match header.vocab {
        Vocab::SentencePiece(v) => spm_metadata(&mut meta, v, config),
        Vocab::Bpe(v) => bpe_metadata(&mut meta, v, config),
    }
    if let Some(t) = header.chat_template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }

    let mut named = Vec::with_capacity(tensors.len());
    for (hf, q) in tensors {
        let name = gguf_name(&hf).with_context(|| format!("no GGUF name for tensor {hf}"))?;
        let q = match permuted_heads(&hf, config) {
            Some(heads) => {
                let data = q.data()?;
                let rows = q.shape().dims()[0];
                let permuted = permute_rows(&data, data.len() / rows, heads, true);
                candle_core::quantized::ggml_file::qtensor_from_ggml(
                    q.dtype(),
                    &permuted,
                    q.shape().dims().to_vec(),
                    &Device::Cpu,
                )?
            }
            None => q,
        };
        named.push((name, q));
    }
    // Llama 3.1's scaling as llama.cpp's converter writes it: a divisor per
    // frequency (1 above the high band, `factor` below the low one,
    // interpolated between). A GGUF source's own divisors are kept as read.
    if let Some(factors) = &config.rope_freq_factors {
        let t = Tensor::from_slice(factors, factors.len(), &Device::Cpu)?;
        named.push((
            ROPE_FREQS.to_string(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    } else if let crate::model::config::RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: old,
    } = config.rope_scaling()?
    {
        let hd = config.head_dim();
        let factors: Vec<f32> = (0..hd)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / config.rope_theta.powf(i as f64 / hd as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < old / high {
                    1.0
                } else if wavelen > old / low {
                    factor as f32
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect();
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &Device::Cpu)?;
        named.push((
            ROPE_FREQS.to_string(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    // llama.cpp's order: embeddings, each block, the final norm and output.
    let rank = |n: &str| -> (usize, usize, String) {
        match n.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((l, rest)) => (1, l.parse().unwrap_or(0), rest.to_string()),
            None if n.starts_with("token_embd") => (0, 0, String::new()),
            None => (2, 0, n.to_string()),
        }
    };
    named.sort_by_key(|(n, _)| rank(n));

    let tmp = path.with_extension("gguf.partial");
    let result = (|| -> Result<()> {
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            named.iter().map(|(n, q)| (n.as_str(), q)).collect();
        candle_core::quantized::gguf_file::write(&mut w, &meta_refs, &tensor_refs)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::io::Write::flush(&mut w)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("moving the finished file to {}", path.display()))
}

/// Checks that every block of `data` (ggml blocks of `dtype`) has finite
/// f16 scales, as llama.cpp's `ggml_validate_row_data` does. A NaN or
/// infinite scale is a corrupt file, and it would not show as one: the
/// products' outputs turn NaN, and the answer ends in "no finite logits"
/// after the whole prompt's work, rather than at load with the tensor's
/// name (once, the activation quantizers turned NaN into zeros, and the
/// model answered garbage as if nothing were wrong). Reading the scales touches
/// every page of the matrix once, which the first token would do anyway.
/// Formats whose layout is not listed here are not checked.
pub fn check_block_scales(dtype: GgmlDType, data: &[u8]) -> Result<()> {
    check_scales_in_parts(dtype, data, 1 << 14)
}

/// `check_block_scales` with parts of at least `min_blocks` blocks per thread.
fn check_scales_in_parts(dtype: GgmlDType, data: &[u8], min_blocks: usize) -> Result<()> {
    // Byte offsets of the f16 scales within a block (d, and dmin or m).
    let offsets: &[usize] = match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => &[0],
        GgmlDType::Q4_1 | GgmlDType::Q5_1 | GgmlDType::Q4K | GgmlDType::Q5K => &[0, 2],
        GgmlDType::Q2K => &[80, 82],
        GgmlDType::Q3K => &[108],
        GgmlDType::Q6K => &[208],
        _ => return Ok(()),
    };
    let size = dtype.type_size();
    // The first block (from `first`) with a non-finite scale, and its bits.
    let scan = |first: usize, blocks: &[u8]| {
        blocks
            .chunks_exact(size)
            .enumerate()
            .find_map(|(b, block)| {
                offsets.iter().find_map(|&at| {
                    let h = u16::from_le_bytes([block[at], block[at + 1]]);
                    (h & 0x7c00 == 0x7c00).then_some((first + b, h))
                })
            })
    };
    // A 7B's 4.4 GB of scales take 0.4 s on one thread: the load's only
    // pass over the weights, so it runs on every core.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let per = data.len().div_ceil(size).div_ceil(threads).max(min_blocks) * size;
    let found = if data.len() <= per {
        scan(0, data)
    } else {
        std::thread::scope(|s| {
            let parts: Vec<_> = data
                .chunks(per)
                .enumerate()
                .map(|(i, part)| s.spawn(move || scan(i * per / size, part)))
                .collect();
            // A scan cannot panic (its reads stay inside whole blocks);
            // were one to, its panic goes on here.
            parts
                .into_iter()
                .map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .find(Option::is_some)
                .flatten()
        })
    };
    match found {
        None => Ok(()),
        Some((b, h)) => {
            let what = if h & 0x03ff == 0 { "infinite" } else { "NaN" };
            anyhow::bail!("block {b} of its {dtype:?} data has a {what} scale (a corrupt file)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every format's scales are found where the format keeps them: a NaN
    /// or infinite one is refused with its block, a finite one passes.
    #[test]
    fn a_non_finite_block_scale_is_found_in_every_format() {
        let w = Tensor::randn(0f32, 1.0, (40, 512), &Device::Cpu).unwrap();
        let formats = [
            (GgmlDType::Q4_0, 0),
            (GgmlDType::Q4_1, 2),
            (GgmlDType::Q5_0, 0),
            (GgmlDType::Q5_1, 2),
            (GgmlDType::Q8_0, 0),
            (GgmlDType::Q2K, 82),
            (GgmlDType::Q3K, 108),
            (GgmlDType::Q4K, 2),
            (GgmlDType::Q5K, 0),
            (GgmlDType::Q6K, 208),
        ];
        for (dtype, at) in formats {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let data = q.data().unwrap().into_owned();
            check_block_scales(dtype, &data).unwrap();
            let b = data.len() / dtype.type_size() - 2;
            // Parts of 3 blocks: the bad block is in a later thread's part.
            let parts = |bad: &[u8]| check_scales_in_parts(dtype, bad, 3);
            for (bits, what) in [(0x7e01u16, "NaN"), (0xfc00, "infinite")] {
                let mut bad = data.clone();
                let at = b * dtype.type_size() + at;
                bad[at..at + 2].copy_from_slice(&bits.to_le_bytes());
                let want =
                    format!("block {b} of its {dtype:?} data has a {what} scale (a corrupt file)");
                assert_eq!(
                    check_block_scales(dtype, &bad).unwrap_err().to_string(),
                    want
                );
                assert_eq!(parts(&bad).unwrap_err().to_string(), want);
            }
        }
    }

    #[test]
    fn permutation_pairs_the_two_halves_of_each_head() {
        // 2 heads of head_dim 4, one byte per row: HF rows 0..8.
        let hf: Vec<u8> = (0..8).collect();
        let gguf = permute_rows(&hf, 1, 2, true);
        assert_eq!(gguf, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(permute_rows(&gguf, 1, 2, false), hf);
        // Wider rows move as a whole.
        let hf: Vec<u8> = (0..16).collect();
        let back = permute_rows(&permute_rows(&hf, 2, 1, true), 2, 1, false);
        assert_eq!(back, hf);
        assert_eq!(&permute_rows(&hf, 2, 2, true)[..4], &[0, 1, 4, 5]);
    }

    /// llama.cpp's required keys for a tiny llama, plus `extra`.
    fn tiny_header(extra: &[(&str, u32)]) -> super::super::gguf_header::tests::RawGguf {
        use super::super::gguf_header::tests::{RawGguf, string};
        let mut raw = RawGguf::default().kv("general.architecture", 8, string("llama"));
        for (key, value) in [
            ("llama.embedding_length", 64),
            ("llama.feed_forward_length", 160),
            ("llama.block_count", 2),
            ("llama.attention.head_count", 4),
        ]
        .iter()
        .chain(extra)
        {
            raw = raw.kv(key, 4, value.to_le_bytes().to_vec());
        }
        raw
    }

    fn open_bytes(name: &str, bytes: &[u8]) -> Result<Gguf> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        Gguf::open(&path)
    }

    #[test]
    fn a_vocabulary_size_comes_only_from_a_two_dimensional_embedding() {
        // No llama.vocab_size, and token_embd.weight with zero dimensions:
        // this indexed an empty shape before.
        let mut raw = tiny_header(&[]).tensor("token_embd.weight", &[], 0, 0);
        raw.data = vec![0u8; 32];
        let err = open_bytes("scalar.gguf", &raw.bytes())
            .map(|_| ())
            .unwrap_err();
        let err = err.to_string();
        assert!(err.contains("token_embd.weight has shape []"), "{err}");
        assert!(!err.contains('\n'));
        let mut raw = tiny_header(&[]).tensor("token_embd.weight", &[64, 10], 0, 0);
        raw.data = vec![0u8; 64 * 10 * 4];
        let gguf = open_bytes("ok.gguf", &raw.bytes()).unwrap();
        assert_eq!(gguf.config().vocab_size, 10);
    }

    #[test]
    fn nan_floats_and_negative_token_ids_are_refused() {
        let mut raw = tiny_header(&[("llama.vocab_size", 10)]).kv(
            "llama.rope.freq_base",
            6,
            f32::NAN.to_le_bytes().to_vec(),
        );
        raw.data = vec![];
        let err = open_bytes("nan.gguf", &raw.bytes())
            .map(|_| ())
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("not a finite number"),
            "{err:#}"
        );
        let raw = tiny_header(&[("llama.vocab_size", 10)]).kv(
            "tokenizer.ggml.bos_token_id",
            5,
            (-1i32).to_le_bytes().to_vec(),
        );
        let err = open_bytes("bos.gguf", &raw.bytes())
            .map(|_| ())
            .unwrap_err();
        assert!(format!("{err:#}").contains("not a token id"), "{err:#}");
    }

    #[test]
    fn sizes_in_the_metadata_are_bounded() {
        let raw = tiny_header(&[("llama.vocab_size", u32::MAX), ("llama.context_length", 8)]);
        let err = open_bytes("huge.gguf", &raw.bytes())
            .map(|_| ())
            .unwrap_err();
        assert!(format!("{err:#}").contains("vocab_size"), "{err:#}");
    }

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(),
            Some("blk.12.attn_output.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    }

    #[test]
    fn a_file_that_is_not_gguf_is_refused_in_a_sentence() {
        let dir = std::env::temp_dir().join(format!("starling-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broken.gguf");
        std::fs::write(&path, b"GGUF\x03\0\0\0 not really").unwrap();
        let err = Gguf::open(&path).err().unwrap().to_string();
        assert!(err.contains("not a valid GGUF file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
