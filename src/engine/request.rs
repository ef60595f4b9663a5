//! What a front end hands the engine, and what it gets back: a request in,
//! a [`Handle`] out that yields the answer's events as the step loop
//! produces them. Dropping the handle (or [`Handle::cancel`]) ends the
//! sequence at the next step and frees its slot.

use super::generate::Outcome;
use super::sampler::{SamplerConfig, TokenLogprobs};
use anyhow::{Result, anyhow};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

/// One answer to generate. Owned, so it can cross to the engine's thread.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The whole prompt, template applied. The engine feeds only what no
    /// kept cache already holds.
    pub prompt: Vec<u32>,
    /// Sampling settings, with the request's own seed.
    pub sampling: SamplerConfig,
    pub max_tokens: usize,
    /// Ids that end the answer (EOS, `<|end_of_turn|>`); never emitted.
    pub stop_ids: Vec<u32>,
    pub stop_texts: Vec<String>,
    /// The answer continues the prompt's text (a raw prompt): its first
    /// word keeps its space.
    pub continuation: bool,
    /// Report each token's log-probabilities with this many alternatives
    /// (`None`: no log-probabilities, and no cost for them).
    pub logprobs: Option<usize>,
}

/// A score request's read-out away from the prompt's last position: the
/// value head at one extra token `id` placed at `position`, attending to
/// the prompt but not to itself (see `Model::probe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub id: u32,
    pub position: usize,
}

/// What the engine reports about a request, in order: text pieces, then
/// exactly one `Finished` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// A generated token (before the text it completes, if any), with its
    /// log-probabilities when the request asked for them.
    Token {
        id: u32,
        logprobs: Option<TokenLogprobs>,
    },
    /// Text that is final (valid UTF-8, never taken back).
    Text(String),
    Finished(Outcome),
    Failed(anyhow::Error),
}

/// A request in flight.
#[derive(Debug)]
pub struct Handle {
    pub(crate) events: Receiver<Event>,
    pub(crate) cancel: Arc<AtomicBool>,
}

impl Handle {
    /// The next event; `None` once the engine has said everything (or is gone).
    pub fn recv(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    /// The next event if one comes within `timeout` (`Ok(None)` if not);
    /// an error once the engine has said everything or is gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Event>> {
        match self.events.recv_timeout(timeout) {
            Ok(event) => Ok(Some(event)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(engine_gone()),
        }
    }

    /// Ends the sequence at the engine's next step: it finishes with
    /// `StopReason::Interrupted` and the text so far.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for the answer, passing each text piece to `on_text`. When
    /// `interrupt` becomes true (Ctrl-C), the sequence is cancelled and the
    /// answer so far returned. An error from `on_text` cancels it too.
    pub fn wait(
        self,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
        interrupt: Option<&AtomicBool>,
    ) -> Result<Outcome> {
        loop {
            if interrupt.is_some_and(|flag| flag.load(Ordering::Relaxed)) {
                self.cancel();
            }
            let event = match interrupt {
                None => self.events.recv().map_err(|_| engine_gone())?,
                // Wake up now and then to see the flag while the engine is busy elsewhere.
                Some(_) => match self.events.recv_timeout(Duration::from_millis(20)) {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return Err(engine_gone()),
                },
            };
            match event {
                Event::Token { .. } => {}
                Event::Text(piece) => {
                    if let Err(e) = on_text(&piece) {
                        self.cancel();
                        return Err(e);
                    }
                }
                Event::Finished(outcome) => return Ok(outcome),
                Event::Failed(e) => return Err(e),
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.cancel();
    }
}

fn engine_gone() -> anyhow::Error {
    anyhow!("the engine stopped before the answer was finished")
}
