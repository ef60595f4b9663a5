//! Text ⇄ ids. Loads `tokenizer.json`, or converts `tokenizer.model` when
//! that is all a model ships, then adds the tokens its configs declare.
//!
//! The one rule enforced here: text is never read as an added token, special
//! or not (`<s>`, `<|end_of_turn|>`, ChatML markers typed USER_DEFINED in a
//! GGUF or `special: false` in tokenizer.json). Only the chat template
//! inserts their ids.
//!
//! How: plain text goes through a second copy of the tokenizer, the
//! *encoder*, which has no added tokens at all but one private sentinel. A
//! rendered prompt is encoded in one call with the sentinel wherever the
//! template put a special token, and each sentinel id is then replaced by
//! that token's id. So every text run is encoded exactly as the tokenizer
//! itself encodes text that follows a special token: with a word-start `▁`
//! in the legacy SentencePiece layout (a `Prepend` normalizer, applied to
//! each run), without one in transformers' `legacy: false` layout
//! (`Metaspace` with `prepend_scheme: "first"`, only at the very start).

pub mod bpe;
pub mod sentencepiece;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};

/// A piece of a rendered prompt: text, or a special token by its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'s> {
    Text(&'s str),
    Special(&'s str),
}

/// A vocabulary as a GGUF file carries it.
#[derive(Debug, Clone)]
pub enum Vocab {
    /// `tokenizer.ggml.model = "llama"`: pieces with scores.
    SentencePiece(sentencepiece::SpmVocab),
    /// `tokenizer.ggml.model = "gpt2"`: tokens and merges.
    Bpe(bpe::BpeVocab),
}

impl Vocab {
    /// Tokens in the vocabulary (the ids run from 0 to this).
    pub fn len(&self) -> usize {
        match self {
            Self::SentencePiece(v) => v.pieces.len(),
            Self::Bpe(v) => v.tokens.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Self::SentencePiece(v) => v.to_tokenizer(),
            Self::Bpe(v) => v.to_tokenizer(),
        }
    }
}

/// The files a tokenizer can come from, as found in a model directory.
#[derive(Debug, Clone, Default)]
pub struct TokenizerFiles {
    pub tokenizer_json: Option<PathBuf>,
    pub sentencepiece_model: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub added_tokens: Option<PathBuf>,
}

/// The parts of `tokenizer_config.json` starling reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizerConfig {
    #[serde(default)]
    pub added_tokens_decoder: BTreeMap<String, AddedTokenEntry>,
    #[serde(default)]
    pub chat_template: Option<ChatTemplateField>,
    #[serde(default)]
    pub bos_token: Option<TokenField>,
    #[serde(default)]
    pub eos_token: Option<TokenField>,
    #[serde(default)]
    pub unk_token: Option<TokenField>,
    #[serde(default)]
    pub pad_token: Option<TokenField>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AddedTokenEntry {
    pub content: String,
    #[serde(default)]
    pub special: bool,
}

/// `chat_template` is a string, or a list of named templates.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ChatTemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct NamedTemplate {
    pub name: String,
    pub template: String,
}

impl ChatTemplateField {
    /// The default template: the only one, or the one named "default" (a
    /// list without one is an error, as in transformers).
    pub fn default_template(&self) -> Result<&str> {
        match self {
            Self::One(t) => Ok(t),
            Self::Named(list) => list
                .iter()
                .find(|t| t.name == "default")
                .map(|t| t.template.as_str())
                .with_context(|| {
                    let names: Vec<&str> = list.iter().take(5).map(|t| t.name.as_str()).collect();
                    format!("the model has several chat templates ({names:?}) and none named \"default\"")
                }),
        }
    }
}

/// `bos_token` / `eos_token` are a string or an AddedToken object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenField {
    Text(String),
    Object { content: String },
}

impl TokenField {
    pub fn content(&self) -> &str {
        match self {
            Self::Text(s) => s,
            Self::Object { content } => content,
        }
    }
}

impl TokenizerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        // serde would read a struct from a JSON array too (`[]` as "no
        // settings"): a tokenizer_config.json must be an object.
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_object() {
            bail!("{}: expected a JSON object", path.display());
        }
        serde_json::from_value(value).with_context(|| format!("parsing {}", path.display()))
    }
}

/// The largest vocabulary id accepted (the config's limit on vocab_size).
const MAX_VOCAB: usize = 1 << 24;

/// Stands in for each template-inserted token while a prompt is encoded.
/// Private-use code points: no text a person types contains this.
const SENTINEL: &str = "\u{F8FF}starling-special\u{F8FF}";

pub struct TextTokenizer {
    /// The tokenizer as the model ships it: decoding, token ids.
    inner: Tokenizer,
    /// Plain-text encoding: no added tokens, only [`SENTINEL`].
    encoder: Tokenizer,
    sentinel: u32,
    /// `byte_tokens[id]`: the id is a byte-fallback token (`<0xNN>`), which
    /// the decoder joins with its neighbours into UTF-8 (or U+FFFD per byte).
    byte_tokens: Vec<bool>,
}

impl TextTokenizer {
    pub fn load(files: &TokenizerFiles, config: Option<&TokenizerConfig>) -> Result<Self> {
        let mut inner = if let Some(json) = &files.tokenizer_json {
            let text = std::fs::read_to_string(json)
                .with_context(|| format!("reading {}", json.display()))?;
            check_tokenizer_json(&text).with_context(|| format!("loading {}", json.display()))?;
            text.parse::<Tokenizer>()
                .map_err(|e| anyhow::anyhow!("{}: {e}", json.display()))
                .context("loading tokenizer.json")?
        } else if let Some(model) = &files.sentencepiece_model {
            let bytes =
                std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
            sentencepiece::SpmVocab::from_model_bytes(&bytes)
                .and_then(|v| v.to_tokenizer())
                .with_context(|| format!("converting {}", model.display()))?
        } else {
            bail!("no tokenizer: the model has neither tokenizer.json nor tokenizer.model");
        };

        let mut declared: BTreeMap<u32, (String, bool)> = BTreeMap::new();
        if let Some(path) = &files.added_tokens {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let map: BTreeMap<String, u32> = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            for (content, id) in map {
                declared.insert(id, (content, true));
            }
        }
        if let Some(config) = config {
            for (id, entry) in &config.added_tokens_decoder {
                let id: u32 = id
                    .parse()
                    .with_context(|| format!("added token id {id:?} is not a number"))?;
                declared.insert(id, (entry.content.clone(), entry.special));
            }
        }
        for (id, (content, special)) in declared {
            add_token_at(&mut inner, id, &content, special)?;
        }
        Self::new(inner)
    }

    /// A tokenizer from a bare SentencePiece vocabulary (a GGUF file's),
    /// under the same rule: text never spells a special token.
    pub fn from_vocab(vocab: &sentencepiece::SpmVocab) -> Result<Self> {
        Self::new(vocab.to_tokenizer()?)
    }

    /// A tokenizer from a GGUF file's vocabulary, of either kind.
    pub fn from_gguf_vocab(vocab: &Vocab) -> Result<Self> {
        Self::new(vocab.to_tokenizer()?)
    }

    fn new(inner: Tokenizer) -> Result<Self> {
        // Ids come from the file: a vocabulary's ids are (nearly) 0..n, and
        // the tokenizers crate allocates per missing id when it serialises
        // or orders the vocabulary, so a stray id of 2^31 would ask for
        // gigabytes.
        let entries = inner.get_vocab_size(true);
        let vocab = inner.get_vocab(true);
        let max_id = vocab.values().copied().max().unwrap_or(0) as usize;
        if max_id >= (2 * entries + 1024).min(MAX_VOCAB) {
            bail!(
                "the vocabulary has {entries} tokens but an id of {max_id}: ids must run from 0 to about the number of tokens"
            );
        }
        // Two tokens with one id: the crate keeps one of them when it
        // writes the vocabulary out, and its merges then no longer fit.
        let distinct: std::collections::HashSet<u32> = vocab.values().copied().collect();
        if distinct.len() != vocab.len() {
            bail!(
                "the vocabulary gives {} tokens only {} distinct ids",
                vocab.len(),
                distinct.len()
            );
        }
        // The encoder: the same normalizer, pre-tokenizer, model and
        // post-processor, without the added tokens.
        let mut json: serde_json::Value = serde_json::from_str(
            &inner
                .to_string(false)
                .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?,
        )?;
        json["added_tokens"] = serde_json::Value::Array(Vec::new());
        let text = json.to_string();
        check_tokenizer_json(&text)?;
        let mut encoder: Tokenizer = text
            .parse()
            .map_err(|e| anyhow::anyhow!("copying the tokenizer: {e}"))?;
        encoder
            .add_special_tokens([AddedToken::from(SENTINEL.to_string(), true)])
            .map_err(anyhow::Error::from_boxed)?;
        let sentinel = encoder
            .token_to_id(SENTINEL)
            .context("the segment sentinel did not get an id")?;
        let mut byte_tokens = vec![false; inner.get_vocab_size(true)];
        for (token, id) in inner.get_vocab(true) {
            if is_byte_piece(&token)
                && let Some(slot) = byte_tokens.get_mut(id as usize)
            {
                *slot = true;
            }
        }
        Ok(Self {
            inner,
            encoder,
            sentinel,
            byte_tokens,
        })
    }

    /// Whether `id` is a byte-fallback token (`<0x00>` … `<0xFF>`).
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.byte_tokens.get(id as usize).copied().unwrap_or(false)
    }

    /// The underlying tokenizer, e.g. to save it as tokenizer.json.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Ids of plain text at the start of the input (no BOS; no added token
    /// is ever recognised in it).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        self.encode_plain(text, false)
    }

    /// Ids of text as `tokenizer(text)` would give them: with the
    /// tokenizer's own BOS (post-processor), still with no added token
    /// recognised in the text.
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_plain(text, true)
    }

    fn encode_plain(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        if text.contains(SENTINEL) {
            bail!("the text contains starling's private segment marker (U+F8FF…)");
        }
        let encoding = self
            .encoder
            .encode_fast(text, add_bos)
            .map_err(|e| anyhow::anyhow!("tokenizing text: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids of a rendered prompt: each text run as the tokenizer encodes
    /// text in that place (after a special token, or at the start), each
    /// special token (any added token, by its text) as its id.
    pub fn encode_segments<'s>(
        &self,
        segments: impl IntoIterator<Item = Segment<'s>>,
    ) -> Result<Vec<u32>> {
        let mut joined = String::new();
        let mut specials = Vec::new();
        for segment in segments {
            match segment {
                Segment::Text(text) => {
                    if text.contains(SENTINEL) {
                        bail!("the text contains starling's private segment marker (U+F8FF…)");
                    }
                    joined.push_str(text);
                }
                Segment::Special(token) => {
                    // An added token only: "<s>" is ordinary text (HTML) in
                    // byte-level vocabularies, and never a BOS there.
                    let id = self
                        .token_id(token)
                        .filter(|&id| {
                            self.inner
                                .get_added_vocabulary()
                                .simple_id_to_token(id)
                                .is_some()
                        })
                        .with_context(|| {
                            format!(
                                "the template needs the special token {token:?}, which this vocabulary does not have (--template raw feeds the text as it is)"
                            )
                        })?;
                    specials.push(id);
                    joined.push_str(SENTINEL);
                }
            }
        }
        if joined.is_empty() {
            return Ok(Vec::new());
        }
        let encoding = self
            .encoder
            .encode_fast(joined.as_str(), false)
            .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        let found = ids.iter().filter(|&&id| id == self.sentinel).count();
        if found != specials.len() {
            // Only a tokenizer whose post-processor or model rewrites added
            // tokens could do this; its ids would not be trustworthy.
            bail!(
                "the tokenizer did not keep the template's {} special tokens apart (found {found})",
                specials.len()
            );
        }
        let mut specials = specials.into_iter();
        for id in ids.iter_mut().filter(|id| **id == self.sentinel) {
            *id = specials.next().unwrap_or(*id);
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding ids: {e}"))
    }

    /// The bytes one token stands for in the text, as OpenAI's logprobs
    /// report them: a byte-fallback token (`<0xE2>`) is its one byte, a
    /// SentencePiece piece has its `▁` as spaces (the leading one kept,
    /// which a decode of the lone token would strip), anything else (an
    /// added token, a byte-level BPE piece) what the decoder makes of it.
    /// Empty for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if self.is_byte_token(id) {
            return u8::from_str_radix(&piece[3..5], 16).map_or_else(|_| Vec::new(), |b| vec![b]);
        }
        if piece.contains('\u{2581}') {
            return piece.replace('\u{2581}', " ").into_bytes();
        }
        self.inner
            .decode(&[id], false)
            .map(String::into_bytes)
            .unwrap_or_else(|_| piece.into_bytes())
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Contents of every added token, special or not, longest first: the
    /// tokens a chat template may write (rendered templates are split on them).
    pub fn template_tokens(&self) -> Vec<(String, u32)> {
        let mut tokens: Vec<(String, u32)> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (t.content, id))
            .filter(|(content, _)| !content.is_empty())
            .collect();
        tokens.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        tokens
    }

    /// Contents of the added tokens marked special, longest first.
    pub fn special_tokens(&self) -> Vec<(String, u32)> {
        let mut specials: Vec<(String, u32)> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        specials
    }
}

/// Checks what the tokenizers crate trusts in a tokenizer.json before it
/// is given the file: how much its normalizer and decoder can grow a text
/// ([`expansion`]), and its BPE merges: it copies each merge into a buffer as
/// long as the longest vocabulary token and subtracts the continuing-subword
/// prefix's length, so a merge longer than every token (or shorter than the
/// prefix) makes it panic (tokenizers 0.23, `BpeBuilder::build`) instead of
/// returning its "merge token out of vocabulary" error.
fn check_tokenizer_json(text: &str) -> Result<()> {
    #[derive(Deserialize)]
    struct File {
        model: Model,
    }
    #[derive(Deserialize)]
    struct Model {
        #[serde(rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        vocab: Option<serde_json::Value>,
        #[serde(default)]
        merges: Vec<serde_json::Value>,
        #[serde(default)]
        continuing_subword_prefix: Option<String>,
    }
    // The crate's decoder and normalizer deserialisers `expect` on what
    // they parse: text that is not JSON, or a precompiled normalizer whose
    // data does not parse, makes them panic (found by scripts/fuzz.sh).
    let json: serde_json::Value =
        serde_json::from_str(text).context("the file is not valid JSON")?;
    check_precompiled(&json["normalizer"], 0)?;
    check_post_processor(&json["post_processor"], 0)?;
    for part in ["normalizer", "decoder"] {
        let factor = expansion(&json[part], 0);
        if factor > MAX_EXPANSION {
            bail!("its {part} can make text {factor} times longer (at most {MAX_EXPANSION})");
        }
    }
    let Ok(file) = serde_json::from_str::<File>(text) else {
        return Ok(()); // the tokenizers crate reports what is wrong
    };
    let model = file.model;
    if model.kind.as_deref().is_some_and(|k| k != "BPE") {
        return Ok(());
    }
    let Some(serde_json::Value::Object(vocab)) = model.vocab else {
        return Ok(());
    };
    let longest = vocab.keys().map(String::len).max().unwrap_or(0);
    let prefix = model.continuing_subword_prefix.map_or(0, |p| p.len());
    for (i, merge) in model.merges.iter().enumerate() {
        let (a, b) = match merge {
            serde_json::Value::String(s) => match s.split_once(' ') {
                Some((a, b)) => (a.to_string(), b.to_string()),
                None => continue,
            },
            serde_json::Value::Array(pair) => match pair.as_slice() {
                [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                    (a.clone(), b.clone())
                }
                _ => continue,
            },
            _ => continue,
        };
        if b.len() < prefix || a.len() + b.len() - prefix > longest {
            bail!("merge {i} ({a:?} + {b:?}) makes a token longer than any in the vocabulary");
        }
    }
    Ok(())
}

/// Parses every `Precompiled` normalizer the way the crate will, but with
/// an error where the crate's wrapper would panic.
fn check_precompiled(normalizer: &serde_json::Value, depth: usize) -> Result<()> {
    if depth > 16 {
        bail!("its normalizer nests too deeply");
    }
    match normalizer.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => {
            for n in normalizer["normalizers"].as_array().into_iter().flatten() {
                check_precompiled(n, depth + 1)?;
            }
        }
        Some("Precompiled") => {
            serde_json::from_value::<tokenizers::normalizers::precompiled::Precompiled>(
                normalizer.clone(),
            )
            .context("its precompiled normalizer does not parse")?;
        }
        _ => {}
    }
    Ok(())
}

/// A `TemplateProcessing` post-processor (the one that adds BOS) must
/// define every special token its templates name, with as many tokens as
/// ids: the crate assumes both and panics when encoding otherwise (found by
/// scripts/fuzz.sh).
fn check_post_processor(processor: &serde_json::Value, depth: usize) -> Result<()> {
    if depth > 16 {
        bail!("its post-processor nests too deeply");
    }
    match processor.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => {
            for p in processor["processors"].as_array().into_iter().flatten() {
                check_post_processor(p, depth + 1)?;
            }
        }
        Some("TemplateProcessing") => {
            let specials = &processor["special_tokens"];
            for piece in ["single", "pair"]
                .iter()
                .filter_map(|k| processor[*k].as_array())
                .flatten()
            {
                let Some(id) = piece.pointer("/SpecialToken/id") else {
                    continue;
                };
                let name = id.as_str().unwrap_or_default();
                let token = specials.get(name).with_context(|| {
                    format!(
                        "its post-processor uses the undefined special token {}",
                        crate::weights::shown(name)
                    )
                })?;
                let ids = token["ids"].as_array().map_or(0, Vec::len);
                let tokens = token["tokens"].as_array().map_or(0, Vec::len);
                if ids != tokens {
                    bail!(
                        "its post-processor's special token {} has {ids} ids and {tokens} tokens",
                        crate::weights::shown(name)
                    );
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// How many times longer a normalizer or decoder can make a text, at most
/// (real ones: `▁` for a space, 3 bytes for 1; NFKC 18 for one ligature).
/// The tokenizers crate applies chained `Replace` rules with no bound, so
/// eight rules that each turn one character into ten ask for 10^8 bytes per
/// character typed.
fn expansion(part: &serde_json::Value, depth: usize) -> u64 {
    let obj = match part {
        serde_json::Value::Object(o) => o,
        _ => return 1,
    };
    if depth > 16 {
        return u64::MAX;
    }
    let text_len =
        |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map_or(0, str::len) as u64;
    match obj.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => ["normalizers", "decoders"]
            .iter()
            .filter_map(|k| obj.get(*k).and_then(|v| v.as_array()))
            .flatten()
            .fold(1u64, |f, p| f.saturating_mul(expansion(p, depth + 1))),
        Some("Replace") => {
            let content = text_len(obj.get("content"));
            let pattern = obj.get("pattern");
            let from = text_len(pattern.and_then(|p| p.get("String")));
            // A regex may match one character, or the empty string between two.
            let per_char = if from > 0 {
                content.div_ceil(from)
            } else {
                content + 1
            };
            per_char.max(1)
        }
        Some("NFKC" | "NFKD") => 18,
        _ => 1,
    }
}

const MAX_EXPANSION: u64 = 256;

/// `<0xNN>` with two upper-case hex digits: SentencePiece's byte pieces.
fn is_byte_piece(token: &str) -> bool {
    let b = token.as_bytes();
    b.len() == 6
        && b.starts_with(b"<0x")
        && b[5] == b'>'
        && b[3..5]
            .iter()
            .all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F'))
}

/// Adds `content` so it gets exactly `id`, or says why it cannot.
fn add_token_at(tokenizer: &mut Tokenizer, id: u32, content: &str, special: bool) -> Result<()> {
    if let Some(existing) = tokenizer.token_to_id(content) {
        if existing != id {
            bail!(
                "added token {content:?} is declared as id {id} but the vocabulary has it as {existing}"
            );
        }
        // Already in the vocabulary: make sure it is an added (special) token.
        if special {
            tokenizer
                .add_special_tokens([AddedToken::from(content.to_string(), true)])
                .map_err(anyhow::Error::from_boxed)?;
        }
        return Ok(());
    }
    let next = tokenizer.get_vocab_size(true) as u32;
    if next != id {
        bail!("added token {content:?} is declared as id {id}, but the next free id is {next}");
    }
    let token = AddedToken::from(content.to_string(), true);
    tokenizer
        .add_special_tokens([token])
        .map_err(anyhow::Error::from_boxed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::sentencepiece::{Piece, PieceKind, SpmVocab};
    use super::*;

    /// A tokenizer.json of a tiny vocabulary, edited by `edit`, loaded as
    /// the CLI loads one.
    fn load_edited(edit: impl FnOnce(&mut serde_json::Value)) -> Result<TextTokenizer> {
        let mut pieces = vec![
            Piece {
                text: "<unk>".into(),
                score: 0.0,
                kind: PieceKind::Unknown,
            },
            Piece {
                text: "<s>".into(),
                score: 0.0,
                kind: PieceKind::Control,
            },
        ];
        for b in 0..=255u8 {
            pieces.push(Piece {
                text: format!("<0x{b:02X}>"),
                score: 0.0,
                kind: PieceKind::Byte,
            });
        }
        for (i, w) in [
            "▁", "h", "e", "l", "o", "he", "ll", "▁he", "▁hell", "▁hello",
        ]
        .iter()
        .enumerate()
        {
            pieces.push(Piece {
                text: (*w).into(),
                score: -(i as f32),
                kind: PieceKind::Normal,
            });
        }
        let vocab = SpmVocab {
            pieces,
            add_dummy_prefix: true,
        };
        let mut json: serde_json::Value = serde_json::from_str(
            &vocab
                .to_tokenizer()?
                .to_string(false)
                .map_err(anyhow::Error::msg)?,
        )?;
        edit(&mut json);
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json.to_string())?;
        let files = TokenizerFiles {
            tokenizer_json: Some(path),
            ..Default::default()
        };
        let t = TextTokenizer::load(&files, None)?;
        t.encode_text("hello hello")?;
        Ok(t)
    }

    /// Both made the tokenizers crate panic inside its deserialiser (the
    /// first was found by scripts/fuzz.sh).
    #[test]
    fn broken_json_and_precompiled_normalizers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let good = load_edited(|_| {})
            .unwrap()
            .inner()
            .to_string(false)
            .unwrap();
        let cut = good.find("\"decoder\"").unwrap() + 20;
        let broken = format!("{}{{\"type\" 5}}", &good[..cut]);
        let garbage = good.replace(
            "\"normalizer\":{",
            "\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Precompiled\",\"precompiled_charsmap\":\"!!\"}]},\"x\":{",
        );
        assert_ne!(garbage, good);
        let undefined = good.replace(
            "\"SpecialToken\":{\"id\":\"<s>\"",
            "\"SpecialToken\":{\"id\":\"<t>\"",
        );
        assert_ne!(undefined, good);
        for text in [broken, garbage, undefined] {
            std::fs::write(&path, &text).unwrap();
            let files = TokenizerFiles {
                tokenizer_json: Some(path.clone()),
                ..Default::default()
            };
            let outcome =
                std::panic::catch_unwind(|| TextTokenizer::load(&files, None).map(|_| ()));
            let err = outcome.expect("loading panicked").unwrap_err();
            assert!(!format!("{err:#}").contains('\n'));
        }
    }

    #[test]
    fn hostile_vocabularies_are_errors_not_panics() {
        load_edited(|_| {}).unwrap();
        // Two tokens with one id; an id far past the vocabulary; a merge
        // longer than every token.
        for edit in [
            Box::new(|j: &mut serde_json::Value| j["model"]["vocab"]["▁hello"] = 0.into())
                as Box<dyn FnOnce(&mut serde_json::Value)>,
            Box::new(|j| j["model"]["vocab"]["▁hell"] = 0.into()),
            Box::new(|j| j["model"]["vocab"]["▁hello"] = (1u64 << 31).into()),
            Box::new(|j| j["model"]["merges"][0] = serde_json::json!(["▁hello", "▁hello"])),
            Box::new(|j| {
                let rule = serde_json::json!({"type": "Replace", "pattern": {"String": "h"}, "content": "hhhhhhhhhh"});
                j["normalizer"] =
                    serde_json::json!({"type": "Sequence", "normalizers": vec![rule; 8]});
            }),
        ] {
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_edited(edit)));
            let result = outcome.expect("loading panicked");
            if let Err(e) = result {
                assert!(!format!("{e:#}").contains('\n'));
            }
        }
        let err = load_edited(|j| {
            let rule =
                serde_json::json!({"type": "Replace", "pattern": {"String": "h"}, "content": "hh"});
            j["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": vec![rule; 9]});
        })
        .err()
        .expect("a normalizer that grows text 512 times is refused");
        assert!(
            format!("{err:#}").contains("normalizer can make text 512 times longer"),
            "{err:#}"
        );
    }
}
