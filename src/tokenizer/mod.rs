//! Text ⇄ ids. Loads `tokenizer.json`, or converts `tokenizer.model` when
//! that is all a model ships, then adds the tokens its configs declare.
//!
//! The one rule enforced here: text is always encoded with special-token
//! parsing off. Only the chat template inserts special ids, by id.

pub mod sentencepiece;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};

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

pub struct TextTokenizer {
    inner: Tokenizer,
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
        // Every added token a template can emit is treated as special, so
        // user text can never spell one: with this set, encoding leaves
        // special tokens' text alone.
        inner.set_encode_special_tokens(true);
        Ok(Self::new(inner))
    }

    /// A tokenizer from a bare SentencePiece vocabulary (a GGUF file's),
    /// under the same rule: text never spells a special token.
    pub fn from_vocab(vocab: &sentencepiece::SpmVocab) -> Result<Self> {
        let mut inner = vocab.to_tokenizer()?;
        inner.set_encode_special_tokens(true);
        Ok(Self::new(inner))
    }

    fn new(inner: Tokenizer) -> Self {
        let mut byte_tokens = vec![false; inner.get_vocab_size(true)];
        for (token, id) in inner.get_vocab(true) {
            if is_byte_piece(&token)
                && let Some(slot) = byte_tokens.get_mut(id as usize)
            {
                *slot = true;
            }
        }
        Self { inner, byte_tokens }
    }

    /// Whether `id` is a byte-fallback token (`<0x00>` … `<0xFF>`).
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.byte_tokens.get(id as usize).copied().unwrap_or(false)
    }

    /// The underlying tokenizer, e.g. to save it as tokenizer.json.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Ids of plain text (no BOS, no special-token parsing). SentencePiece
    /// tokenizers prepend their word-start marker to each call's text, so
    /// callers encode each run of text between special tokens separately.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing text: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids of text as `tokenizer(text)` would give them: with the tokenizer's
    /// own BOS (post-processor), still without special-token parsing.
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing text: {e}"))?;
        Ok(encoding.get_ids().to_vec())
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

    /// Contents of the special added tokens, longest first (for splitting
    /// rendered templates on them).
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
