//! One answer in progress, between two forward passes: the sampler, the
//! streaming detokenizer and the stop matcher of a single sequence. The
//! single-sequence [`generate`](super::generate) loop and the engine's step
//! loop both drive it, so an answer ends the same way whoever runs it.

use super::detokenizer::StreamDecoder;
use super::generate::StopReason;
use super::sampler::{Sampler, TokenLogprobs};
use super::stop::StopMatcher;
use crate::tokenizer::TextTokenizer;
use anyhow::Result;
use candle_core::Tensor;

pub struct Sequence<'t> {
    sampler: Sampler,
    /// How many alternatives each token's log-probabilities list, when asked.
    logprobs: Option<usize>,
    /// Without a tokenizer (a benchmark, a scorer) there is no text.
    decoder: Option<StreamDecoder<'t>>,
    ids: Vec<u32>,
    stops: StopMatcher,
    stop_ids: Vec<u32>,
    max_tokens: usize,
    generated: usize,
    text: String,
}

/// What to do after sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Feed this token and come back with the logits after it.
    Feed(u32),
    /// The answer is over (call [`Sequence::finish`]).
    Stop(StopReason),
}

impl<'t> Sequence<'t> {
    /// `prompt` is given when the answer continues it (a raw prompt): the
    /// text then keeps the first word's space (see [`StreamDecoder::continuing`]).
    pub fn new(
        tokenizer: Option<&'t TextTokenizer>,
        sampler: Sampler,
        stop_ids: &[u32],
        stop_texts: &[String],
        max_tokens: usize,
        continues: Option<&[u32]>,
    ) -> Self {
        Self {
            sampler,
            logprobs: None,
            decoder: tokenizer.map(|t| match continues {
                Some(prompt) => StreamDecoder::continuing(t, prompt),
                None => StreamDecoder::new(t),
            }),
            ids: Vec::new(),
            stops: StopMatcher::new(stop_texts),
            stop_ids: stop_ids.to_vec(),
            max_tokens,
            generated: 0,
            text: String::new(),
        }
    }

    /// Reports each token's log-probabilities with `top` alternatives
    /// (see [`TokenLogprobs`]).
    pub fn with_logprobs(mut self, top: Option<usize>) -> Self {
        self.logprobs = top;
        self
    }

    /// Samples the token after `history` (every id the cache holds) from
    /// its `logits` (`[vocab]`, f32), passes the text it makes final to
    /// `emit`, and says whether to feed it. `room` says whether the
    /// context has a position left for it.
    ///
    /// `on_token` hears each generated token (with its log-probabilities
    /// when asked) before the text it completes.
    pub fn advance(
        &mut self,
        logits: &Tensor,
        history: &[u32],
        room: bool,
        on_token: &mut dyn FnMut(u32, Option<TokenLogprobs>) -> Result<()>,
        emit: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Next> {
        if self.generated >= self.max_tokens {
            return Ok(Next::Stop(StopReason::MaxTokens));
        }
        let (token, logprobs) = match self.logprobs {
            None => (self.sampler.sample(logits, history)?, None),
            Some(top) => {
                let (token, lp) = self.sampler.sample_with_logprobs(logits, history, top)?;
                (token, Some(lp))
            }
        };
        if self.stop_ids.contains(&token) {
            return Ok(Next::Stop(StopReason::EndToken));
        }
        self.generated += 1;
        self.ids.push(token);
        on_token(token, logprobs)?;
        let piece = match &mut self.decoder {
            Some(decoder) => decoder.push(token)?,
            None => None,
        };
        if let Some(piece) = piece {
            let (out, stopped) = self.stops.push(&piece).into_parts();
            self.emit(&out, emit)?;
            if stopped {
                return Ok(Next::Stop(StopReason::StopText));
            }
        }
        if self.generated == self.max_tokens {
            return Ok(Next::Stop(StopReason::MaxTokens));
        }
        if !room {
            return Ok(Next::Stop(StopReason::ContextFull));
        }
        Ok(Next::Feed(token))
    }

    /// Ends the answer for `reason`: emits what the detokenizer and the
    /// stop matcher still hold (unless a stop text ended it), which may
    /// itself complete a stop text. Returns the final reason.
    pub fn finish(
        &mut self,
        reason: StopReason,
        emit: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<StopReason> {
        if reason == StopReason::StopText {
            return Ok(reason);
        }
        let rest = match &mut self.decoder {
            Some(decoder) => decoder.finish()?,
            None => None,
        };
        if let Some(rest) = rest {
            let (out, stopped) = self.stops.push(&rest).into_parts();
            self.emit(&out, emit)?;
            if stopped {
                return Ok(StopReason::StopText);
            }
        }
        let held = self.stops.finish();
        self.emit(&held, emit)?;
        Ok(reason)
    }

    fn emit(&mut self, piece: &str, emit: &mut dyn FnMut(&str) -> Result<()>) -> Result<()> {
        if !piece.is_empty() {
            self.text.push_str(piece);
            emit(piece)?;
        }
        Ok(())
    }

    /// Tokens generated so far (an end token is not counted).
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// The generated ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn into_sampler(self) -> Sampler {
        self.sampler
    }

    /// The text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}
