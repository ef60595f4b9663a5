//! A conversation on top of the engine: each turn renders the conversation
//! with the template and submits it whole; the engine feeds only what the
//! kept cache of the previous turn has not seen. Because every prompt is the plain re-rendering of the conversation,
//! an answer here is exactly what `starling run --messages` gives for the
//! same conversation; the cache only saves work.
//!
//! When the conversation outgrows the context, the oldest exchanges leave
//! the rendered window (the system message stays); they stay in the history,
//! so `/save` never loses them.

use super::generate::{Stats, StopReason};
use super::request::GenerateRequest;
use super::sampler::SamplerConfig;
use super::scheduler::Engine;
use crate::template::{Message, Template};
use crate::tokenizer::TextTokenizer;
use anyhow::{Result, bail};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

#[derive(Debug, Clone)]
pub struct ChatSettings {
    pub sampling: SamplerConfig,
    pub max_tokens: usize,
    pub stop_texts: Vec<String>,
}

pub struct TurnReport {
    pub text: String,
    pub stop: StopReason,
    pub stats: Stats,
    /// Exchanges that left the context window to make this turn fit.
    pub dropped: usize,
}

pub struct Chat {
    engine: Engine,
    tokenizer: Arc<TextTokenizer>,
    /// Positions the conversation's cache holds after the last answer.
    held: usize,
    template: Template,
    stop_ids: Vec<u32>,
    system: Option<String>,
    /// The whole conversation (user and assistant turns), never trimmed.
    messages: Vec<Message>,
    /// First message inside the context window.
    window_start: usize,
    pub settings: ChatSettings,
    /// Answers since the seed was set: each answer draws from seed + this.
    answers: u64,
    last: Option<Stats>,
}

impl Chat {
    /// `tokenizer` is the one the engine's model was loaded with.
    pub fn new(
        engine: Engine,
        tokenizer: Arc<TextTokenizer>,
        template: Template,
        stop_ids: Vec<u32>,
        settings: ChatSettings,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            held: 0,
            template,
            stop_ids,
            system: None,
            messages: Vec::new(),
            window_start: 0,
            settings,
            answers: 0,
            last: None,
        }
    }

    /// Adds a user message and answers it. On failure the message is taken
    /// back, so the conversation is as it was.
    pub fn say(
        &mut self,
        user: &str,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
        interrupt: Option<&AtomicBool>,
    ) -> Result<TurnReport> {
        self.messages.push(Message::new("user", user));
        let result = self.answer(on_text, interrupt);
        if result.is_err() {
            self.messages.pop();
        }
        result
    }

    /// Answers the last user message again (replacing the last answer).
    /// The cache is cut back to the prompt, nothing is re-encoded.
    pub fn retry(
        &mut self,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
        interrupt: Option<&AtomicBool>,
    ) -> Result<TurnReport> {
        let previous = match self.messages.last() {
            Some(m) if m.role == "assistant" => self.messages.pop(),
            Some(m) if m.role == "user" => None,
            _ => bail!("nothing to retry"),
        };
        let result = self.answer(on_text, interrupt);
        if result.is_err()
            && let Some(p) = previous
        {
            self.messages.push(p);
        }
        result
    }

    /// Drops the last exchange (the last user message and its answer).
    pub fn undo(&mut self) -> Result<()> {
        if self.messages.last().is_some_and(|m| m.role == "assistant") {
            self.messages.pop();
        }
        match self.messages.last() {
            Some(m) if m.role == "user" => {
                self.messages.pop();
            }
            _ => bail!("nothing to undo"),
        }
        self.window_start = self.window_start.min(self.messages.len());
        Ok(())
    }

    /// A new conversation with the same system message and settings.
    pub fn clear(&mut self) {
        self.messages.clear();
        self.window_start = 0;
    }

    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system.filter(|s| !s.is_empty());
    }

    pub fn set_template(&mut self, template: Template) {
        self.template = template;
    }

    pub fn template(&self) -> &Template {
        &self.template
    }

    /// Sets the seed; the next answer draws from it afresh.
    pub fn set_seed(&mut self, seed: u64) {
        self.settings.sampling.seed = seed;
        self.answers = 0;
    }

    /// The conversation as a `--messages` file holds it (system first).
    pub fn transcript(&self) -> Vec<Message> {
        self.system
            .iter()
            .map(|s| Message::new("system", s.clone()))
            .chain(self.messages.iter().cloned())
            .collect()
    }

    /// Replaces the conversation (a leading system message becomes the system prompt).
    pub fn load(&mut self, mut messages: Vec<Message>) -> Result<()> {
        for m in &messages {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                bail!("unknown message role {:?}", m.role);
            }
        }
        let system = if messages.first().is_some_and(|m| m.role == "system") {
            Some(messages.remove(0).content)
        } else {
            None
        };
        if messages.iter().any(|m| m.role == "system") {
            bail!("only the first message may be a system message");
        }
        self.system = system;
        self.messages = messages;
        self.window_start = 0;
        Ok(())
    }

    /// Positions the cache holds, and the model's context.
    pub fn context(&self) -> (usize, usize) {
        (self.held, self.engine.context())
    }

    pub fn last_stats(&self) -> Option<&Stats> {
        self.last.as_ref()
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    fn answer(
        &mut self,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
        interrupt: Option<&AtomicBool>,
    ) -> Result<TurnReport> {
        let (prompt, dropped) = self.fit()?;
        let sampling = SamplerConfig {
            seed: self.settings.sampling.seed.wrapping_add(self.answers),
            ..self.settings.sampling.clone()
        };
        self.answers += 1;
        let request = GenerateRequest {
            prompt,
            sampling,
            max_tokens: self.settings.max_tokens,
            stop_ids: self.stop_ids.clone(),
            stop_texts: self.settings.stop_texts.clone(),
            continuation: false,
            logprobs: None,
        };
        let outcome = self.engine.submit(request)?.wait(on_text, interrupt)?;
        self.held = outcome.context_len;
        // Even an interrupted answer is part of the conversation.
        self.messages
            .push(Message::new("assistant", outcome.text.clone()));
        self.last = Some(outcome.stats.clone());
        Ok(TurnReport {
            text: outcome.text,
            stop: outcome.stop,
            stats: outcome.stats,
            dropped,
        })
    }

    fn render(&self, from: usize) -> Result<Vec<u32>> {
        let messages: Vec<Message> = self
            .system
            .iter()
            .map(|s| Message::new("system", s.clone()))
            .chain(self.messages[from..].iter().cloned())
            .collect();
        self.template.encode(&self.tokenizer, &messages)
    }

    /// The prompt for the next answer, leaving room for it: drops the
    /// oldest exchanges from the window until the prompt fits.
    fn fit(&mut self) -> Result<(Vec<u32>, usize)> {
        let max = self.engine.context();
        let room = self.settings.max_tokens.clamp(1, (max / 4).max(1));
        // `room` tokens need room - 1 positions after the prompt: the last is never fed.
        let budget = (max + 1).saturating_sub(room);
        let mut dropped = 0;
        let window_start = self.window_start;
        loop {
            let prompt = self.render(self.window_start)?;
            if prompt.len() <= budget {
                return Ok((prompt, dropped));
            }
            // Drop the oldest user message and everything up to the next one.
            let last_user = self.messages.iter().rposition(|m| m.role == "user");
            let next_user = self.messages[self.window_start + 1..]
                .iter()
                .position(|m| m.role == "user")
                .map(|i| i + self.window_start + 1);
            match (next_user, last_user) {
                (Some(next), Some(last)) if next <= last => {
                    self.window_start = next;
                    dropped += 1;
                }
                _ => {
                    // Refused: the conversation stays as it was.
                    self.window_start = window_start;
                    bail!(
                        "the message is too long: the prompt is {} tokens and the context is {max} (keeping {room} for the answer)",
                        prompt.len()
                    )
                }
            }
        }
    }
}
