//! Byte-level BPE vocabularies (GPT-2's scheme, used by Llama 3 and Qwen2)
//! as GGUF files carry them: `tokenizer.ggml.model = "gpt2"`, the tokens,
//! their types and the merges, and `tokenizer.ggml.pre` naming how text is
//! split into words before the merges apply.
//!
//! The conversion builds the tokenizer.json those models publish (a
//! `Split` pre-tokenizer per regex, then `ByteLevel`; a BPE model; a
//! `ByteLevel` decoder) and hands it to the tokenizers crate, so encoding
//! is the crate's, exactly as transformers' fast tokenizers run it.
//!
//! The pre-tokenizers are data: [`PRE_TOKENIZERS`] lists each family with
//! the names llama.cpp writes for it and the regexes of the family's
//! tokenizer.json (from llama.cpp's `llama-vocab.cpp`, whose comments keep
//! the originals); a name not listed is refused with the list.

use super::sentencepiece::PieceKind;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

/// One family of pre-tokenizers: how text is split into words.
#[derive(Debug)]
pub struct PreTokenizer {
    /// The family, as starling names it in messages.
    pub family: &'static str,
    /// Values of `tokenizer.ggml.pre` that mean this family.
    pub names: &'static [&'static str],
    /// Applied in order, each splitting every piece the previous left
    /// (matches and the text between them both kept: `Isolated`).
    pub regexes: &'static [&'static str],
    /// Words that are whole tokens skip the merges (Llama 3's
    /// `ignore_merges`; llama.cpp does the same for this family).
    pub ignore_merges: bool,
    /// Whether the tokenizer adds BOS to a text (`tokenizer(text)`).
    pub add_bos: bool,
}

/// GPT-2's word split, which many families share.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// The supported pre-tokenizer families.
pub const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        family: "llama3",
        names: &["llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"],
        regexes: &[
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizer {
        family: "qwen2",
        names: &["qwen2", "stablelm2", "hunyuan"],
        regexes: &[
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        family: "gpt2",
        names: &["gpt-2", "gpt2", "mpt", "olmo"],
        regexes: &[GPT2],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        family: "starcoder",
        names: &["starcoder", "refact", "command-r", "smollm", "codeshell"],
        regexes: &[r"\p{N}", GPT2],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        family: "falcon",
        names: &["falcon"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        family: "deepseek-coder",
        names: &["deepseek-coder"],
        regexes: &[
            "[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            "[一-龥ࠀ-一가-퟿]+",
            r"\p{N}",
        ],
        ignore_merges: false,
        add_bos: true,
    },
];

/// The family `tokenizer.ggml.pre` names (`None`: GPT-2's, as llama.cpp
/// assumes for old files).
pub fn pre_tokenizer(name: Option<&str>) -> Result<&'static PreTokenizer> {
    let name = name.unwrap_or("gpt-2");
    PRE_TOKENIZERS
        .iter()
        .find(|p| p.names.contains(&name))
        .with_context(|| {
            let known: Vec<&str> = PRE_TOKENIZERS
                .iter()
                .flat_map(|p| p.names)
                .copied()
                .collect();
            format!(
                "pre-tokenizer {} is not supported (tokenizer.ggml.pre; supported: {})",
                crate::weights::shown(name),
                known.join(", ")
            )
        })
}

/// The longest token accepted, in bytes (real ones are a few dozen).
const MAX_TOKEN_BYTES: usize = 1 << 12;

/// A byte-level BPE vocabulary as GGUF stores it.
#[derive(Debug, Clone)]
pub struct BpeVocab {
    /// Token texts in GPT-2's byte-to-unicode alphabet, by id.
    pub tokens: Vec<String>,
    pub kinds: Vec<PieceKind>,
    /// `"left right"`, highest priority first.
    pub merges: Vec<String>,
    pub pre: &'static PreTokenizer,
    /// `tokenizer.ggml.pre` as the file says it (written back by `quantize`).
    pub pre_name: String,
    pub bos: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` when the file says; else the family's.
    pub add_bos: bool,
}

impl BpeVocab {
    /// The vocabulary of a byte-level BPE tokenizer.json (the layout Llama 3
    /// and Qwen2 publish), to write as GGUF: the family is found by its
    /// pre-tokenizer's regexes; added tokens take their ids (special:
    /// control, else user-defined).
    pub fn from_tokenizer_json(text: &str, bos: Option<u32>) -> Result<Self> {
        let doc: Value = serde_json::from_str(text).context("parsing tokenizer.json")?;
        let model = &doc["model"];
        if model["type"] != "BPE" {
            bail!("tokenizer.json's model is not BPE");
        }
        let vocab = model["vocab"]
            .as_object()
            .context("tokenizer.json has no model.vocab")?;
        let added = doc["added_tokens"].as_array().cloned().unwrap_or_default();
        let mut by_id: std::collections::BTreeMap<u64, (String, PieceKind)> = Default::default();
        for (token, id) in vocab {
            let id = id.as_u64().context("a vocabulary id is not a number")?;
            by_id.insert(id, (token.clone(), PieceKind::Normal));
        }
        for t in &added {
            let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
                bail!("an added token has no id or content");
            };
            let kind = if t["special"].as_bool().unwrap_or(false) {
                PieceKind::Control
            } else {
                PieceKind::UserDefined
            };
            by_id.insert(id, (content.to_string(), kind));
        }
        let n = by_id.len();
        if by_id.keys().enumerate().any(|(i, &id)| id != i as u64) {
            bail!(
                "tokenizer.json's ids do not run from 0 to {}",
                n.saturating_sub(1)
            );
        }
        let (tokens, kinds) = by_id.into_values().unzip();
        let merges = model["merges"]
            .as_array()
            .context("tokenizer.json has no model.merges")?
            .iter()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(pair) => match (
                    pair.first().and_then(Value::as_str),
                    pair.get(1).and_then(Value::as_str),
                ) {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => bail!("a merge is not a pair of strings"),
                },
                _ => bail!("a merge is not a string or a pair"),
            })
            .collect::<Result<Vec<_>>>()?;
        // The family: the Split regexes before ByteLevel, or GPT-2's own
        // (ByteLevel with use_regex).
        let pre = &doc["pre_tokenizer"];
        let mut regexes: Vec<&str> = Vec::new();
        let steps: Vec<&Value> = match pre["type"].as_str() {
            Some("Sequence") => pre["pretokenizers"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default(),
            _ => vec![pre],
        };
        for step in steps {
            match step["type"].as_str() {
                Some("Split") => regexes.extend(step["pattern"]["Regex"].as_str()),
                Some("ByteLevel") if step["use_regex"].as_bool().unwrap_or(true) => {
                    regexes.push(GPT2)
                }
                _ => {}
            }
        }
        let family = PRE_TOKENIZERS
            .iter()
            .find(|p| p.regexes == regexes.as_slice())
            .context("tokenizer.json's pre-tokenizer is none of the supported families (see bpe::PRE_TOKENIZERS)")?;
        let add_bos = doc["post_processor"]
            .to_string()
            .contains("TemplateProcessing")
            && bos.is_some();
        Ok(Self {
            tokens,
            kinds,
            merges,
            pre: family,
            pre_name: family.names[0].to_string(),
            bos,
            add_bos,
        })
    }

    /// The tokenizer in the layout the models publish as tokenizer.json.
    /// Control tokens become special added tokens, user-defined ones plain
    /// added tokens (starling never reads either from text: see the module
    /// above).
    pub fn to_tokenizer(&self) -> Result<Tokenizer> {
        if self.kinds.len() != self.tokens.len() {
            bail!(
                "{} token types for {} tokens",
                self.kinds.len(),
                self.tokens.len()
            );
        }
        if let Some((i, t)) = self
            .tokens
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > MAX_TOKEN_BYTES)
        {
            bail!(
                "token {i} is {} bytes long (at most {MAX_TOKEN_BYTES})",
                t.len()
            );
        }
        let mut vocab = serde_json::Map::with_capacity(self.tokens.len());
        let mut added = Vec::new();
        for (id, (text, kind)) in self.tokens.iter().zip(&self.kinds).enumerate() {
            if vocab.insert(text.clone(), json!(id)).is_some() {
                bail!(
                    "token {} appears twice (id {id})",
                    crate::weights::shown(text)
                );
            }
            if matches!(kind, PieceKind::Control | PieceKind::UserDefined) {
                let special = *kind == PieceKind::Control;
                added.push(json!({
                    "id": id, "content": text, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": !special, "special": special,
                }));
            }
        }
        let mut pre: Vec<Value> = self
            .pre
            .regexes
            .iter()
            .map(|r| {
                json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false})
            })
            .collect();
        pre.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
        let post = match (self.add_bos, self.bos) {
            (true, Some(bos)) => {
                let text = self
                    .tokens
                    .get(bos as usize)
                    .with_context(|| format!("BOS id {bos} is not in the vocabulary"))?;
                json!({"type": "Sequence", "processors": [
                    byte_level,
                    {"type": "TemplateProcessing",
                     "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                     "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                              {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                     "special_tokens": {text.clone(): {"id": text, "ids": [bos], "tokens": [text]}}}
                ]})
            }
            _ => byte_level,
        };
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": self.pre.ignore_merges,
                "vocab": vocab, "merges": self.merges,
            },
        });
        doc.to_string()
            .parse::<Tokenizer>()
            .map_err(|e| anyhow::anyhow!("building the byte-level BPE tokenizer: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_found_by_every_name_and_unknown_names_list_them() {
        assert_eq!(pre_tokenizer(Some("llama-bpe")).unwrap().family, "llama3");
        assert_eq!(pre_tokenizer(Some("qwen2")).unwrap().family, "qwen2");
        assert_eq!(pre_tokenizer(None).unwrap().family, "gpt2");
        let err = pre_tokenizer(Some("klingon")).unwrap_err().to_string();
        assert!(err.contains("\"klingon\" is not supported"), "{err}");
        assert!(err.contains("llama-bpe") && err.contains("qwen2"), "{err}");
        // No name twice.
        let mut names: Vec<&str> = PRE_TOKENIZERS
            .iter()
            .flat_map(|p| p.names)
            .copied()
            .collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    fn tiny(pre: &str) -> BpeVocab {
        // Bytes 'a' 'b' ' ' in GPT-2's alphabet ('Ġ' is the space), and merges.
        let tokens = ["a", "b", "Ġ", "ab", "Ġab", "<s>"];
        BpeVocab {
            tokens: tokens.iter().map(|s| s.to_string()).collect(),
            kinds: vec![
                PieceKind::Normal,
                PieceKind::Normal,
                PieceKind::Normal,
                PieceKind::Normal,
                PieceKind::Normal,
                PieceKind::Control,
            ],
            merges: vec!["a b".into(), "Ġ ab".into()],
            pre: pre_tokenizer(Some(pre)).unwrap(),
            pre_name: pre.into(),
            bos: Some(5),
            add_bos: true,
        }
    }

    #[test]
    fn text_is_split_merged_and_decoded_back() {
        let t = tiny("llama-bpe").to_tokenizer().unwrap();
        let enc = t.encode("ab ab", true).unwrap();
        assert_eq!(enc.get_ids(), &[5, 3, 4]);
        assert_eq!(t.decode(&[3, 4], true).unwrap(), "ab ab");
    }

    #[test]
    fn broken_vocabularies_are_refused() {
        let mut v = tiny("gpt2");
        v.tokens[1] = "a".into();
        assert!(
            v.to_tokenizer()
                .unwrap_err()
                .to_string()
                .contains("appears twice")
        );
        let mut v = tiny("gpt2");
        v.merges.push("x y".into());
        assert!(v.to_tokenizer().is_err());
        let mut v = tiny("gpt2");
        v.kinds.pop();
        assert!(v.to_tokenizer().is_err());
        let mut v = tiny("gpt2");
        v.tokens[0] = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(
            v.to_tokenizer()
                .unwrap_err()
                .to_string()
                .contains("bytes long")
        );
    }
}
