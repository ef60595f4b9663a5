//! A model plus the token ids its KV cache holds. Feeding a prompt reuses
//! the longest cached prefix and feeds only the rest: the difference
//! between a chat turn that costs its new tokens and one that re-reads the
//! whole conversation.

use crate::model::{KvCache, Logits, Model};
use anyhow::{Result, bail};
use candle_core::Tensor;

pub struct Session {
    model: Model,
    cache: KvCache,
    /// Exactly the ids whose keys and values the cache holds, in order.
    fed: Vec<u32>,
}

/// What a prefill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefill {
    /// Prompt positions already in the cache.
    pub cached: usize,
    /// Prompt positions fed now.
    pub new: usize,
}

impl Session {
    pub fn new(model: Model) -> Self {
        let cache = model.new_cache();
        Self {
            model,
            cache,
            fed: Vec::new(),
        }
    }

    /// The context length (positions the model can hold).
    pub fn max_len(&self) -> usize {
        self.model.max_len()
    }

    /// Ids currently in the cache.
    pub fn fed(&self) -> &[u32] {
        &self.fed
    }

    /// Forgets everything from position `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.fed.truncate(len);
        self.cache.truncate(len);
    }

    /// Makes the cache hold exactly `prompt` and returns the last position's logits.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<(Tensor, Prefill)> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() > self.max_len() {
            bail!(
                "the prompt is {} tokens, longer than the model's context of {} tokens",
                prompt.len(),
                self.max_len()
            );
        }
        let common = self
            .fed
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least the last prompt token is fed again: its logits are needed.
        let keep =
            self.model
                .reusable_prefix(&self.cache, prompt.len(), common.min(prompt.len() - 1));
        self.truncate(keep);
        let logits = self.feed(&prompt[keep..], Logits::Last)?;
        Ok((
            logits,
            Prefill {
                cached: keep,
                new: prompt.len() - keep,
            },
        ))
    }

    /// Feeds one sampled token (a decode row), returning the next logits.
    pub fn step(&mut self, token: u32) -> Result<Tensor> {
        self.fed_after(&[token], |model, cache| model.forward_token(token, cache))
    }

    /// Feeds prompt positions `ids` after the cache; on error the cache is
    /// rolled back so it never holds positions `fed` does not list.
    pub fn feed(&mut self, ids: &[u32], which: Logits) -> Result<Tensor> {
        self.fed_after(ids, |model, cache| model.forward(ids, cache, which))
    }

    fn fed_after(
        &mut self,
        ids: &[u32],
        forward: impl FnOnce(&Model, &mut KvCache) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let before = self.fed.len();
        match forward(&self.model, &mut self.cache) {
            Ok(logits) => {
                self.fed.extend_from_slice(ids);
                Ok(logits)
            }
            Err(e) => {
                self.cache.truncate(before);
                Err(e)
            }
        }
    }
}
