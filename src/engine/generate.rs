//! The generation loop every front end shares: prefill (reusing the cached
//! prefix), then sample → stream → feed, one token at a time, until an end
//! token, a stop text, the token budget, the context, or an interrupt.

use super::sampler::Sampler;
use super::sequence::{Next, Sequence};
use super::session::Session;
use crate::tokenizer::TextTokenizer;
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub struct Request<'a> {
    pub prompt: &'a [u32],
    pub max_tokens: usize,
    /// Ids that end the answer (EOS, `<|end_of_turn|>`); never printed.
    pub stop_ids: &'a [u32],
    pub stop_texts: &'a [String],
    /// Set from another thread (Ctrl-C) to end the answer early.
    pub interrupt: Option<&'a AtomicBool>,
    /// The answer continues the prompt's text (a raw prompt, no template):
    /// it is exactly decode(prompt + answer) minus decode(prompt), so its
    /// first word keeps its space. A chat answer starts fresh instead.
    pub continuation: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndToken,
    StopText,
    MaxTokens,
    ContextFull,
    Interrupted,
}

impl StopReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::EndToken => "eos",
            Self::StopText => "stop",
            Self::MaxTokens => "length",
            Self::ContextFull => "context",
            Self::Interrupted => "interrupted",
        }
    }
}

/// Figures for `--verbose` and `/stats`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub new_tokens: usize,
    pub prompt_s: f64,
    pub gen_tokens: usize,
    pub gen_s: f64,
    pub ttft_s: f64,
    /// Seconds from submission until the sequence got a KV slot (0 when
    /// nothing queues, as in a single-sequence run).
    pub queue_s: f64,
}

impl Stats {
    pub fn prompt_tps(&self) -> f64 {
        rate(self.new_tokens, self.prompt_s)
    }
    pub fn gen_tps(&self) -> f64 {
        rate(self.gen_tokens, self.gen_s)
    }

    /// One logfmt line: `prompt_tokens=… cached_tokens=… new_tokens=… prompt_tps=… gen_tokens=… gen_tps=… ttft_s=…`.
    pub fn logfmt(&self) -> String {
        format!(
            "prompt_tokens={} cached_tokens={} new_tokens={} prompt_tps={:.2} gen_tokens={} gen_tps={:.2} ttft_s={:.3}",
            self.prompt_tokens,
            self.cached_tokens,
            self.new_tokens,
            self.prompt_tps(),
            self.gen_tokens,
            self.gen_tps(),
            self.ttft_s
        )
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub text: String,
    pub ids: Vec<u32>,
    pub stop: StopReason,
    pub stats: Stats,
    /// Positions the sequence's cache holds at the end (prompt and the
    /// answer's fed tokens).
    pub context_len: usize,
    /// A score request's reward (the value head's output); `None` for answers.
    pub reward: Option<f32>,
}

/// Generates an answer to `req.prompt`, calling `on_text` with each piece of
/// text as soon as it is final.
pub fn generate(
    session: &mut Session,
    tokenizer: &TextTokenizer,
    sampler: &mut Sampler,
    req: &Request<'_>,
    on_text: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Outcome> {
    let start = Instant::now();
    let (mut logits, prefill) = session.prefill(req.prompt)?;
    let prompt_s = start.elapsed().as_secs_f64();
    let gen_start = Instant::now();
    let mut ttft_s = 0.0;
    let mut sequence = Sequence::new(
        Some(tokenizer),
        std::mem::replace(sampler, Sampler::new(Default::default())),
        req.stop_ids,
        req.stop_texts,
        req.max_tokens,
        req.continuation.then_some(req.prompt),
    );
    let reason = loop {
        if req.interrupt.is_some_and(|f| f.load(Ordering::Relaxed)) {
            break StopReason::Interrupted;
        }
        let room = session.fed().len() < session.max_len();
        let next = sequence.advance(&logits, session.fed(), room, &mut |_, _| Ok(()), on_text)?;
        if ttft_s == 0.0 {
            ttft_s = start.elapsed().as_secs_f64();
        }
        match next {
            Next::Feed(token) => logits = session.step(token)?,
            Next::Stop(reason) => break reason,
        }
    };
    let stop = sequence.finish(reason, on_text)?;
    let stats = Stats {
        prompt_tokens: req.prompt.len(),
        cached_tokens: prefill.cached,
        new_tokens: prefill.new,
        prompt_s,
        gen_tokens: sequence.generated(),
        gen_s: gen_start.elapsed().as_secs_f64(),
        ttft_s,
        queue_s: 0.0,
    };
    let outcome = Outcome {
        text: sequence.text().to_string(),
        ids: sequence.ids().to_vec(),
        stop,
        stats,
        context_len: session.fed().len(),
        reward: None,
    };
    // The caller's sampler carries on from where this answer left it.
    *sampler = sequence.into_sampler();
    Ok(outcome)
}
