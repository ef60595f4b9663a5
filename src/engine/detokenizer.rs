//! Turns a growing list of ids into text as soon as each piece is complete
//! UTF-8, such that the concatenated pieces equal the tokenizer's decode of
//! all the ids.
//!
//! Decoding ids one by one is wrong for SentencePiece (the decoder strips
//! the first space of every call, and an emoji may span several byte
//! tokens). So, as Hugging Face's text-generation-inference does, each step
//! decodes a short window that starts one token before the new text and
//! emits only what that window adds. The window is two or three ids, so a
//! step costs a few microseconds next to a forward pass of the model.

use crate::tokenizer::TextTokenizer;
use anyhow::Result;

pub struct StreamDecoder<'t> {
    tokenizer: &'t TextTokenizer,
    ids: Vec<u32>,
    /// Start of the window: one token before the unread text.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tokenizer: &'t TextTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds `id`; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before)
        {
            let text = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(text))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (an incomplete byte sequence at the end),
    /// decoded as the tokenizer would.
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read == self.ids.len() {
            return Ok(None);
        }
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(after
            .strip_prefix(before.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
