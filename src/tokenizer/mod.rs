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
    /// The default template (the only one, or the one named "default").
    pub fn default_template(&self) -> Option<&str> {
        match self {
            Self::One(t) => Some(t),
            Self::Named(list) => list
                .iter()
                .find(|t| t.name == "default")
                .or(list.first())
                .map(|t| t.template.as_str()),
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
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

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
            Tokenizer::from_file(json)
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

    fn new(inner: Tokenizer) -> Result<Self> {
        // The encoder: the same normalizer, pre-tokenizer, model and
        // post-processor, without the added tokens.
        let mut json: serde_json::Value = serde_json::from_str(
            &inner
                .to_string(false)
                .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?,
        )?;
        json["added_tokens"] = serde_json::Value::Array(Vec::new());
        let mut encoder: Tokenizer = json
            .to_string()
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
                    let id = self.token_id(token).with_context(|| {
                        format!("the chat template needs the token {token:?}, which this tokenizer does not have")
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
        let mut specials = specials.into_iter();
        let ids: Vec<u32> = encoding
            .get_ids()
            .iter()
            .map(|&id| {
                if id == self.sentinel {
                    specials.next().expect("one sentinel per special token")
                } else {
                    id
                }
            })
            .collect();
        debug_assert!(specials.next().is_none());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding ids: {e}"))
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
