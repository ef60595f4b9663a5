//! The engine: one thread owns the model and the KV memory and runs the
//! step loop; front ends only queue requests and read events (as in
//! llama.cpp's server, where HTTP threads queue tasks and one loop owns
//! the slots).
//!
//! Each step builds one batch: a decode row for every running sequence,
//! then prefill chunks of the sequences still reading their prompts, up to
//! `batch_tokens` rows in all, and runs one forward pass over it (every
//! weight block read once for all rows). Long prompts are thus prefilled
//! across steps while the running streams keep producing tokens.
//!
//! KV memory is `parallel` slots, each a contiguous cache of up to
//! `context` positions that grows as it fills. A contiguous slot per
//! sequence (rather than shared blocks) keeps attention a strided view of
//! one buffer, lets a sequence's cache be cut back to any prefix for
//! free, and is what llama.cpp's server does. A finished sequence leaves its
//! cache in its slot as a kept prefix: a new request goes to the idle slot
//! whose cache shares the longest prefix with its prompt (the least
//! recently used one when none does) and feeds only the rest. That is how a
//! chat turn feeds only its new tokens, and how a common system prompt is
//! read once.

use super::generate::{Outcome, Stats, StopReason};
use super::request::{Event, GenerateRequest, Handle, Probe};
use super::sampler::{Sampler, SamplerConfig};
use super::sequence::{Next, Sequence};
use crate::model::{Chunk, KvCache, Model, PREFILL_CHUNK};
use crate::tokenizer::TextTokenizer;
use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::Tensor;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Prompt rows per step when none is given: a 7B model prefills about
/// 20-50 tokens/s on two cores, so 16 rows keep a step near half a second
/// (a running stream's longest pause while a long prompt arrives), and the
/// panels' unpacking is spread over sixteen rows (a chunk of fewer costs
/// about what one of a dozen does).
pub const DEFAULT_BATCH_TOKENS: usize = 16;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded at once (KV slots).
    pub parallel: usize,
    /// Prompt rows per forward pass, on top of every running sequence's
    /// decode row; also the size of a prompt's chunks.
    pub batch_tokens: usize,
    /// Positions per sequence; `None`: the model's context, capped so that
    /// all slots fit in half the memory available at start where the
    /// caches live (the host's, or the GPU's on CUDA).
    pub context: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            parallel: 1,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            context: None,
        }
    }
}

/// What the engine is doing, for metrics and admission: read at any time
/// from any thread.
#[derive(Debug, Default)]
pub struct EngineLoad {
    /// Sequences submitted and not yet in a slot.
    waiting: AtomicUsize,
    /// Sequences in a slot (prefilling or decoding).
    running: AtomicUsize,
    /// Positions the running sequences' caches hold.
    kv_used: AtomicUsize,
}

impl EngineLoad {
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// A sequence leaves its slot: the gauge drops before its client hears
    /// the end (the step loop recounts after every step; a sequence admitted
    /// in this step is not counted yet, hence saturating).
    fn leave(&self) {
        let _ = self
            .running
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// Positions the running sequences hold.
    pub fn kv_used(&self) -> usize {
        self.kv_used.load(Ordering::Relaxed)
    }
}

/// The running engine. Dropping it lets the running sequences finish
/// their current step, then stops the thread.
pub struct Engine {
    load: Arc<EngineLoad>,
    queue: Option<Sender<Submission>>,
    worker: Option<JoinHandle<()>>,
    context: usize,
    parallel: usize,
    kv_bytes_per_position: usize,
    memory: Memory,
}

/// The memory the KV budget was sized against: the host's on the CPU,
/// the GPU's on CUDA.
#[derive(Clone, Copy)]
struct Memory {
    /// Bytes free for new allocations when the engine started, if known.
    available: Option<u64>,
    gpu: bool,
}

impl Memory {
    /// What it is, in words.
    fn kind(self) -> &'static str {
        crate::loader::memory_kind_of(self.gpu)
    }
}

struct Submission {
    request: GenerateRequest,
    events: Sender<Event>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    /// Sequences that share this one's prefill (`submit_n`): each gets a
    /// copy of the prompt's cache and its own seed.
    followers: Vec<Submission>,
    kind: Kind,
}

/// What a request wants from its prompt's pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Tokens sampled from the logits, one step after another.
    Generate,
    /// The model's output at the prompt's last position (a reward model's
    /// value head), or at a probe; nothing is sampled.
    Score(Option<Probe>),
}

impl Engine {
    /// Starts the step loop on its own thread, with a compute pool of
    /// `RAYON_NUM_THREADS` (or all) cores that the loop itself is part of.
    /// Without a tokenizer, answers have ids but no text (stop texts never match).
    pub fn start(
        model: impl Into<Arc<Model>>,
        tokenizer: Option<Arc<TextTokenizer>>,
        config: EngineConfig,
    ) -> Result<Self> {
        let model = model.into();
        ensure!(config.parallel >= 1, "--parallel must be at least 1");
        ensure!(
            config.batch_tokens >= 1,
            "--batch-tokens must be at least 1"
        );
        let per_position = model.kv_bytes_per_position();
        let kv_f32 = model.kv_dtype() == candle_core::DType::F32;
        let memory = Memory {
            available: crate::loader::memory_available_on(model.device()),
            gpu: !model.device().is_cpu(),
        };
        let context = slot_context(&config, model.max_len(), per_position, kv_f32, memory)?;
        let (queue, submissions) = mpsc::channel();
        let pool = rayon::ThreadPoolBuilder::new()
            .stack_size(8 << 20)
            .thread_name(|i| format!("starling-compute-{i}"))
            .build()
            .context("starting the compute threads")?;
        let parallel = config.parallel;
        let batch_tokens = config.batch_tokens;
        let load = Arc::new(EngineLoad::default());
        let shared_load = load.clone();
        let worker = std::thread::Builder::new()
            .name("starling-engine".into())
            .stack_size(8 << 20)
            .spawn(move || {
                // The loop runs on a worker of the pool, so each matrix
                // product splits its rows between it and the other workers
                // instead of waking them all and sleeping.
                pool.install(|| {
                    let mut state = StepLoop::new(
                        &model,
                        tokenizer.as_deref(),
                        parallel,
                        batch_tokens,
                        context,
                        shared_load,
                    );
                    state.run(submissions);
                });
                // The slots' caches went with the loop's state; the pool,
                // tokenizer and model (if this was its last user) go now.
                drop((pool, tokenizer, model));
                release_free_memory();
            })
            .context("starting the engine thread")?;
        Ok(Self {
            load,
            queue: Some(queue),
            worker: Some(worker),
            context,
            parallel,
            kv_bytes_per_position: per_position,
            memory,
        })
    }

    /// Queues `request`; its events arrive on the returned handle. Refused
    /// at once (nothing queued) when the prompt is empty or longer than a
    /// sequence's context.
    pub fn submit(&self, request: GenerateRequest) -> Result<Handle> {
        let mut handles = self.submit_n(request, 1)?;
        Ok(handles.pop().expect("one handle"))
    }

    /// Queues `n` answers to one prompt that share its prefill: the prompt
    /// is fed once and its cache copied (forked) into the other sequences'
    /// slots. Answer `i` samples with seed `request.sampling.seed + i`.
    /// `n` may not exceed the engine's `parallel`.
    pub fn submit_n(&self, request: GenerateRequest, n: usize) -> Result<Vec<Handle>> {
        if request.prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if request.prompt.len() > self.context {
            bail!(
                "the prompt is {} tokens, longer than the model's context of {} tokens",
                request.prompt.len(),
                self.context
            );
        }
        if n == 0 || n > self.parallel {
            bail!(
                "n must be between 1 and {} (the sequences decoded at once), not {n}",
                self.parallel
            );
        }
        request.sampling.validate()?;
        let submitted = Instant::now();
        let mut handles = Vec::with_capacity(n);
        let mut all: Vec<Submission> = (0..n)
            .map(|i| {
                let (events, rx) = mpsc::channel();
                let cancel = Arc::new(AtomicBool::new(false));
                handles.push(Handle {
                    events: rx,
                    cancel: cancel.clone(),
                });
                let mut request = request.clone();
                request.sampling.seed = request.sampling.seed.wrapping_add(i as u64);
                Submission {
                    request,
                    events,
                    cancel,
                    submitted,
                    followers: Vec::new(),
                    kind: Kind::Generate,
                }
            })
            .collect();
        let mut leader = all.remove(0);
        leader.followers = all;
        self.load.waiting.fetch_add(n, Ordering::Relaxed);
        self.queue
            .as_ref()
            .and_then(|q| q.send(leader).ok())
            .ok_or_else(|| anyhow!("the engine has stopped"))?;
        Ok(handles)
    }

    /// Queues a score request: `prompt` is fed like any other (sharing
    /// the engine's passes over the weights, and any kept prefix), and the
    /// model's output `[out]` at its last position (or at `probe`) comes
    /// back as `Outcome::reward` (its first value) instead of an answer.
    /// For a reward model, whose head is `v_head`: its reward.
    pub fn submit_score(&self, prompt: Vec<u32>, probe: Option<Probe>) -> Result<Handle> {
        if prompt.is_empty() {
            bail!("nothing to score: no tokens");
        }
        if prompt.len() > self.context {
            bail!(
                "the input is {} tokens, longer than the model's context of {} tokens",
                prompt.len(),
                self.context
            );
        }
        let (events, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let submission = Submission {
            request: GenerateRequest {
                prompt,
                sampling: SamplerConfig::default(),
                max_tokens: 0,
                stop_ids: Vec::new(),
                stop_texts: Vec::new(),
                continuation: false,
                logprobs: None,
            },
            events,
            cancel: cancel.clone(),
            submitted: Instant::now(),
            followers: Vec::new(),
            kind: Kind::Score(probe),
        };
        self.load.waiting.fetch_add(1, Ordering::Relaxed);
        self.queue
            .as_ref()
            .and_then(|q| q.send(submission).ok())
            .ok_or_else(|| anyhow!("the engine has stopped"))?;
        Ok(Handle { events: rx, cancel })
    }

    /// What the engine is doing now.
    pub fn load(&self) -> &EngineLoad {
        &self.load
    }

    /// Positions all slots may hold together.
    pub fn kv_capacity(&self) -> usize {
        self.parallel * self.context
    }

    /// Positions each sequence may hold (prompt and answer).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Sequences decoded at once.
    pub fn parallel(&self) -> usize {
        self.parallel
    }

    /// The KV budget, for `--verbose`.
    pub fn describe(&self) -> String {
        let total = self.parallel * self.context * self.kv_bytes_per_position;
        let available = self.memory.available.map_or_else(
            || "unknown".to_string(),
            |b| format!("{:.2}", b as f64 / 1e9),
        );
        format!(
            "kv_slots={} kv_context={} kv_bytes_per_position={} kv_budget_gb={:.2} kv_memory={} kv_memory_available_gb={available}",
            self.parallel,
            self.context,
            self.kv_bytes_per_position,
            total as f64 / 1e9,
            if self.memory.gpu { "gpu" } else { "host" },
        )
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// How long the engine waits idle before `release_free_memory`.
const TRIM_AFTER: Duration = Duration::from_secs(1);

/// Hands the allocator's free memory back to the system when the engine
/// has nothing to do (it walks every arena, so not between steps). `free`
/// returns only the top of each glibc heap; `malloc_trim` also releases the
/// free pages inside them (`madvise(MADV_DONTNEED)`), where a prompt step's
/// activations and the caches of finished sequences stayed resident after
/// the work was done (`bench --parallel 1,2,4,8` measured 0.14 GB more at
/// B=8 than B=8 alone).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages to the kernel; every
    // allocation stays valid.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Positions per slot: asked for, or the model's, capped so that every
/// slot full fits in half the memory available now where the caches live
/// (`memory`: the host's within a cgroup's limit, or the GPU's). `kv_f32`:
/// whether the cache is f32, so that an f16 one is worth suggesting.
fn slot_context(
    config: &EngineConfig,
    max_len: usize,
    per_position: usize,
    kv_f32: bool,
    memory: Memory,
) -> Result<usize> {
    if let Some(context) = config.context {
        ensure!(context >= 1, "the context must be at least 1 position");
        let context = context.min(max_len);
        // A context given is still bounded by memory: the caches grow as
        // they fill, and would otherwise grow into the OOM killer (or the
        // GPU's out-of-memory error).
        if let Some(bytes) = memory.available {
            let need = (config.parallel * context) as u64 * per_position as u64;
            let fits = bytes / 2 / (context * per_position.max(1)) as u64;
            // Said in what every front end has (`bench` sets the context
            // from -p and -n, and takes no --ctx-size).
            let f16 = if kv_f32 {
                ", or an f16 KV cache (--kv-type f16)"
            } else {
                ""
            };
            let hint = if fits == 0 {
                format!("not even one fits: a shorter context{f16}")
            } else {
                format!(
                    "{fits} such sequences fit: fewer sequences (--parallel), a shorter context{f16}"
                )
            };
            ensure!(
                need <= bytes / 2,
                "{} sequence{} of {context} positions need {:.1} GB of KV cache, more than half the {:.1} GB of {} available: {hint}",
                config.parallel,
                if config.parallel == 1 { "" } else { "s" },
                need as f64 / 1e9,
                bytes as f64 / 1e9,
                memory.kind(),
            );
        }
        return Ok(context);
    }
    let cap = memory
        .available
        .map(|bytes| bytes / 2 / (config.parallel * per_position.max(1)) as u64)
        .unwrap_or(u64::MAX);
    let context = (max_len as u64).min(cap) as usize;
    ensure!(
        context >= max_len.min(256),
        "{} sequences of KV cache do not fit in {} (each position takes {per_position} bytes): give a smaller --parallel",
        config.parallel,
        memory.kind()
    );
    Ok(context)
}

/// A KV slot: a cache, the ids it holds, and the sequence using it, if any.
struct Slot<'t> {
    cache: KvCache,
    /// Exactly the ids whose keys and values the cache holds, in order.
    fed: Vec<u32>,
    /// Step of the last use, for least-recently-used eviction.
    last_used: u64,
    active: Option<Active<'t>>,
}

/// A sequence being prefilled or decoded.
struct Active<'t> {
    submission: Submission,
    sequence: Sequence<'t>,
    /// Prompt ids the cache holds so far.
    prompt_done: usize,
    /// The sampled token to feed next (decode phase).
    pending: u32,
    cached: usize,
    admitted: Instant,
    prefilled: Option<Instant>,
    ttft_s: f64,
    /// Slots of the sequences waiting for this one's prefill.
    followers: Vec<usize>,
    /// A follower waits for its leader's prefill instead of feeding its prompt.
    follows: bool,
    /// A score request's result, once read.
    reward: Option<f32>,
}

/// What one slot feeds in a step.
#[derive(Clone, Copy)]
enum Feed {
    Prompt { from: usize, to: usize },
    Token,
}

struct StepLoop<'t> {
    model: &'t Model,
    tokenizer: Option<&'t TextTokenizer>,
    slots: Vec<Slot<'t>>,
    waiting: VecDeque<Submission>,
    batch_tokens: usize,
    context: usize,
    step: u64,
    load: Arc<EngineLoad>,
}

impl<'t> StepLoop<'t> {
    fn new(
        model: &'t Model,
        tokenizer: Option<&'t TextTokenizer>,
        parallel: usize,
        batch_tokens: usize,
        context: usize,
        load: Arc<EngineLoad>,
    ) -> Self {
        let slots = (0..parallel)
            .map(|_| Slot {
                cache: model.new_cache_of(context),
                fed: Vec::new(),
                last_used: 0,
                active: None,
            })
            .collect();
        Self {
            model,
            tokenizer,
            slots,
            waiting: VecDeque::new(),
            batch_tokens,
            context,
            step: 0,
            load,
        }
    }

    fn run(&mut self, submissions: Receiver<Submission>) {
        loop {
            let busy = !self.waiting.is_empty() || self.slots.iter().any(|s| s.active.is_some());
            if !busy {
                // Idle: after a pause with nothing to do, hand freed memory
                // back, so a client sending request after request does not
                // pay for a trim and the page faults after it every time.
                let first = match submissions.recv_timeout(TRIM_AFTER) {
                    Err(RecvTimeoutError::Timeout) => {
                        release_free_memory();
                        submissions.recv().ok()
                    }
                    other => other.ok(),
                };
                match first {
                    Some(s) => self.waiting.push_back(s),
                    None => return,
                }
            }
            while let Ok(s) = submissions.try_recv() {
                self.waiting.push_back(s);
            }
            self.step += 1;
            self.cancel_finished_clients();
            self.admit();
            self.run_step();
            let running = self.slots.iter().filter(|s| s.active.is_some());
            let (count, positions) = running.fold((0, 0), |(n, p), s| (n + 1, p + s.fed.len()));
            self.load.running.store(count, Ordering::Relaxed);
            self.load.kv_used.store(positions, Ordering::Relaxed);
        }
    }

    /// Ends the sequences whose client cancelled or went away, and drops
    /// cancelled requests that never started.
    fn cancel_finished_clients(&mut self) {
        let load = &self.load;
        self.waiting.retain(|s| {
            let cancelled = s.cancel.load(Ordering::Relaxed);
            if cancelled {
                // The request and the answers that were to share its prefill.
                for s in std::iter::once(s).chain(&s.followers) {
                    let _ = s.events.send(Event::Finished(Outcome {
                        text: String::new(),
                        ids: Vec::new(),
                        stop: StopReason::Interrupted,
                        stats: Stats {
                            prompt_tokens: s.request.prompt.len(),
                            queue_s: s.submitted.elapsed().as_secs_f64(),
                            ..Stats::default()
                        },
                        context_len: 0,
                        reward: None,
                    }));
                }
                load.waiting
                    .fetch_sub(1 + s.followers.len(), Ordering::Relaxed);
            }
            !cancelled
        });
        for i in 0..self.slots.len() {
            // A follower still waiting for its leader's prefill ends after the fork.
            let cancelled = self.slots[i]
                .active
                .as_ref()
                .is_some_and(|a| !a.follows && a.submission.cancel.load(Ordering::Relaxed));
            if cancelled {
                self.finish(i, StopReason::Interrupted);
            }
        }
    }

    /// Moves waiting requests into idle slots, first come first served.
    fn admit(&mut self) {
        while let Some(next) = self.waiting.front() {
            let idle: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].active.is_none())
                .collect();
            if idle.len() < 1 + next.followers.len() {
                return;
            }
            let prompt = &next.request.prompt;
            // The idle slot sharing the longest prefix, else the least recently used.
            let leader = *idle
                .iter()
                .max_by(|&&a, &&b| {
                    let (sa, sb) = (&self.slots[a], &self.slots[b]);
                    common_prefix(&sa.fed, prompt)
                        .cmp(&common_prefix(&sb.fed, prompt))
                        .then(sb.last_used.cmp(&sa.last_used))
                })
                .expect("an idle slot");
            let common = common_prefix(&self.slots[leader].fed, prompt);
            let mut submission = self.waiting.pop_front().expect("not empty");
            self.load
                .waiting
                .fetch_sub(1 + submission.followers.len(), Ordering::Relaxed);
            // Followers take the least recently used of the other idle slots.
            let mut others: Vec<usize> = idle.into_iter().filter(|&i| i != leader).collect();
            others.sort_by_key(|&i| self.slots[i].last_used);
            let followers: Vec<usize> = others
                .into_iter()
                .take(submission.followers.len())
                .collect();
            for (&slot, follower) in followers.iter().zip(submission.followers.drain(..)) {
                self.start(slot, follower, 0, true);
            }
            // At least the last prompt token is fed again: its logits are needed.
            // A score is read from a fresh cache: the same input gives the
            // same reward bit for bit, whatever ran before or beside it.
            let len = submission.request.prompt.len();
            let keep = match submission.kind {
                Kind::Generate => {
                    self.model
                        .reusable_prefix(&self.slots[leader].cache, len, common.min(len - 1))
                }
                Kind::Score(_) => 0,
            };
            self.start(leader, submission, keep, false);
            if let Some(a) = self.slots[leader].active.as_mut() {
                a.followers = followers;
            }
        }
    }

    /// Puts `submission` in slot `i`, whose first `keep` positions it reuses.
    fn start(&mut self, i: usize, submission: Submission, keep: usize, follows: bool) {
        let request = &submission.request;
        let slot = &mut self.slots[i];
        slot.fed.truncate(keep);
        slot.cache.truncate(keep);
        let sequence = Sequence::new(
            self.tokenizer,
            Sampler::new(request.sampling.clone()),
            &request.stop_ids,
            &request.stop_texts,
            request.max_tokens,
            request.continuation.then_some(request.prompt.as_slice()),
        )
        .with_logprobs(request.logprobs);
        slot.active = Some(Active {
            submission,
            sequence,
            prompt_done: keep,
            pending: 0,
            cached: keep,
            admitted: Instant::now(),
            prefilled: None,
            ttft_s: 0.0,
            followers: Vec::new(),
            follows,
            reward: None,
        });
    }

    /// One forward pass over a decode row for every sequence that has a
    /// token to feed and prefill chunks up to the batch budget; then
    /// samples for every sequence whose logits came out.
    fn run_step(&mut self) {
        let mut plan: Vec<Option<(Feed, bool)>> = vec![None; self.slots.len()];
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(a) = &slot.active
                && a.prefilled.is_some()
            {
                plan[i] = Some((Feed::Token, true));
            }
        }
        // Prompts in the order they arrived.
        let mut order: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                self.slots[i]
                    .active
                    .as_ref()
                    .is_some_and(|a| a.prefilled.is_none() && !a.follows)
            })
            .collect();
        order.sort_by_key(|&i| self.slots[i].active.as_ref().map(|a| a.admitted));
        // A prompt is cut into chunks of `batch_tokens` from where its cache
        // ends (where it is cut changes no result: see `Chunk::prompt`); up
        // to `batch_tokens` prompt rows a step, first come first served, on
        // top of the decode rows. A chunk's
        // attention scores grow with its length times the context: capped.
        let chunk = self.batch_tokens.min(PREFILL_CHUNK);
        let mut budget = self.batch_tokens;
        for i in order {
            let a = self.slots[i].active.as_ref().expect("active");
            let len = a.submission.request.prompt.len();
            let take = (len - a.prompt_done).min(chunk);
            if take > budget {
                break;
            }
            budget -= take;
            let to = a.prompt_done + take;
            plan[i] = Some((
                Feed::Prompt {
                    from: a.prompt_done,
                    to,
                },
                to == len,
            ));
        }
        if plan.iter().all(Option::is_none) {
            return;
        }

        let result = {
            let mut chunks = Vec::new();
            for (slot, p) in self.slots.iter_mut().zip(&plan) {
                let Some((feed, logits)) = *p else { continue };
                let Slot { cache, active, .. } = slot;
                let a = active.as_ref().expect("planned slots are active");
                let prompt = &a.submission.request.prompt;
                // A prompt is one pass for rope, however many steps read it.
                let (ids, seq_len) = match feed {
                    Feed::Prompt { from, to } => (&prompt[from..to], prompt.len()),
                    Feed::Token => (std::slice::from_ref(&a.pending), cache.len() + 1),
                };
                chunks.push(Chunk {
                    ids,
                    cache,
                    logits,
                    seq_len,
                    prompt: matches!(feed, Feed::Prompt { .. }),
                });
            }
            self.model.forward_batch(&mut chunks)
        };
        let logits = match result {
            Ok(logits) => logits,
            Err(e) => {
                // The caches committed nothing: fail every sequence of the batch.
                for (i, p) in plan.iter().enumerate() {
                    if p.is_some() {
                        self.fail(i, anyhow!("{e:#}"));
                    }
                }
                return;
            }
        };

        let mut row = 0;
        for (i, p) in plan.iter().enumerate() {
            let Some((feed, wants_logits)) = *p else {
                continue;
            };
            let slot = &mut self.slots[i];
            let a = slot.active.as_mut().expect("planned slots are active");
            match feed {
                Feed::Prompt { from, to } => {
                    slot.fed
                        .extend_from_slice(&a.submission.request.prompt[from..to]);
                    a.prompt_done = to;
                    if to == a.submission.request.prompt.len() {
                        a.prefilled = Some(Instant::now());
                    }
                }
                Feed::Token => slot.fed.push(a.pending),
            }
            if !wants_logits {
                continue;
            }
            let next = logits
                .as_ref()
                .ok_or_else(|| anyhow!("the forward pass returned no logits"))
                .and_then(|l| Ok(l.get(row)?));
            row += 1;
            let followers = std::mem::take(&mut a.followers);
            let next = match next {
                Ok(next) => next,
                Err(e) => {
                    for f in followers {
                        self.fail(f, anyhow!("{e:#}"));
                    }
                    self.fail(i, e);
                    continue;
                }
            };
            if let Kind::Score(probe) = a.submission.kind {
                self.score(i, &next, probe);
                continue;
            }
            for f in followers {
                self.fork(i, f);
                self.sample(f, &next);
            }
            self.sample(i, &next);
        }
    }

    /// Gives follower slot `f` a copy of leader slot `i`'s cache: the
    /// prompt it shares, fed once.
    fn fork(&mut self, i: usize, f: usize) {
        let (leader, follower) = if i < f {
            let (a, b) = self.slots.split_at_mut(f);
            (&a[i], &mut b[0])
        } else {
            let (a, b) = self.slots.split_at_mut(i);
            (&b[0], &mut a[f])
        };
        let copied = follower.cache.copy_from(&leader.cache, leader.fed.len());
        follower.fed.clone_from(&leader.fed);
        if let Err(e) = copied {
            follower.fed.clear();
            follower.cache.truncate(0);
            self.fail(f, e);
            return;
        }
        if let Some(a) = follower.active.as_mut() {
            a.follows = false;
            a.prompt_done = a.submission.request.prompt.len();
            a.cached = a.prompt_done;
            a.prefilled = Some(Instant::now());
        }
    }

    /// Samples slot `i`'s next token from `logits` (`[vocab]`) and sends its text.
    fn sample(&mut self, i: usize, logits: &Tensor) {
        let slot = &mut self.slots[i];
        let Some(a) = slot.active.as_mut() else {
            return;
        };
        let room = slot.fed.len() < self.context;
        let events = &a.submission.events;
        let gone = std::cell::Cell::new(false);
        let send = |event: Event| -> Result<()> {
            events.send(event).map_err(|_| {
                gone.set(true);
                anyhow!("the client went away")
            })
        };
        let next = a.sequence.advance(
            logits,
            &slot.fed,
            room,
            &mut |id, logprobs| send(Event::Token { id, logprobs }),
            &mut |piece| send(Event::Text(piece.to_string())),
        );
        if a.ttft_s == 0.0 {
            a.ttft_s = a.submission.submitted.elapsed().as_secs_f64();
        }
        match next {
            Ok(Next::Feed(token)) => a.pending = token,
            Ok(Next::Stop(reason)) => self.finish(i, reason),
            Err(_) if gone.get() => self.finish(i, StopReason::Interrupted),
            Err(e) => self.fail(i, e),
        }
    }

    /// Ends score request `i` with the model's output `[out]` at the
    /// prompt's end, or at `probe` (one more row, outside the batch: it
    /// reads the slot's cache and writes nothing to it).
    fn score(&mut self, i: usize, output: &Tensor, probe: Option<Probe>) {
        let slot = &mut self.slots[i];
        let value = match probe {
            None => Ok(output.clone()),
            Some(p) => self.model.probe(p.id, p.position, &mut slot.cache),
        }
        .and_then(|t| {
            let values = t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
            let v = values
                .first()
                .copied()
                .ok_or_else(|| anyhow!("the model's output is empty"))?;
            ensure!(
                v.is_finite(),
                "the model's output is {v}, not a finite number (its weights, or the activations in this dtype, overflow)"
            );
            Ok(v)
        });
        match value {
            Ok(v) => {
                if let Some(a) = slot.active.as_mut() {
                    a.reward = Some(v);
                    a.ttft_s = a.submission.submitted.elapsed().as_secs_f64();
                }
                self.finish(i, StopReason::MaxTokens);
            }
            Err(e) => self.fail(i, e),
        }
    }

    /// Ends slot `i`'s sequence and reports it; the cache stays as a kept prefix.
    fn finish(&mut self, i: usize, reason: StopReason) {
        let step = self.step;
        let slot = &mut self.slots[i];
        let Some(mut a) = slot.active.take() else {
            return;
        };
        slot.last_used = step;
        // Followers still waiting for this prefill end with it.
        for f in std::mem::take(&mut a.followers) {
            self.finish(f, reason);
        }
        let slot = &mut self.slots[i];
        let events = &a.submission.events;
        let mut emit = |piece: &str| -> Result<()> {
            let _ = events.send(Event::Text(piece.to_string()));
            Ok(())
        };
        let stop = a.sequence.finish(reason, &mut emit).unwrap_or(reason);
        let now = Instant::now();
        let prefilled = a.prefilled.unwrap_or(now);
        let request = &a.submission.request;
        let stats = Stats {
            prompt_tokens: request.prompt.len(),
            cached_tokens: a.cached,
            new_tokens: request.prompt.len() - a.cached,
            prompt_s: (prefilled - a.admitted).as_secs_f64(),
            gen_tokens: a.sequence.generated(),
            gen_s: (now - prefilled).as_secs_f64(),
            ttft_s: a.ttft_s,
            queue_s: (a.admitted - a.submission.submitted).as_secs_f64(),
        };
        self.load.leave();
        let outcome = Outcome {
            text: a.sequence.text().to_string(),
            ids: a.sequence.ids().to_vec(),
            stop,
            stats,
            context_len: slot.fed.len(),
            reward: a.reward,
        };
        let _ = a.submission.events.send(Event::Finished(outcome));
    }

    /// Ends slot `i`'s sequence with an error; its cache stays consistent.
    fn fail(&mut self, i: usize, error: anyhow::Error) {
        let step = self.step;
        let slot = &mut self.slots[i];
        if let Some(a) = slot.active.take() {
            slot.last_used = step;
            for f in a.followers {
                self.fail(f, anyhow!("{error:#}"));
            }
            self.load.leave();
            let _ = a.submission.events.send(Event::Failed(error));
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A KV budget past half the memory is refused with what fits, in
    /// words every front end has (`bench` takes no --ctx-size), and an f16
    /// cache is suggested only to an f32 one.
    #[test]
    fn a_kv_budget_past_half_the_memory_says_what_fits() {
        let config = |parallel, context| EngineConfig {
            parallel,
            batch_tokens: 16,
            context: Some(context),
        };
        let host = Memory {
            available: Some(4_000_000_000),
            gpu: false,
        };
        // A position the size of the memory: not even one fits.
        let e = slot_context(&config(1, 4), 4, 4_000_000_000, false, host)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(": not even one fits: a shorter context"), "{e}");
        let e = slot_context(&config(1, 4), 4, 4_000_000_000, true, host)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("a shorter context, or an f16 KV cache (--kv-type f16)"),
            "{e}"
        );
        // Positions of a tenth of the half: ten sequences of one fit.
        let e = slot_context(&config(100, 1), 1, 200_000_000, false, host)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "100 sequences of 1 positions need 20.0 GB of KV cache, more than half the 4.0 GB of memory available: 10 such sequences fit: fewer sequences (--parallel), a shorter context"
        );
        assert_eq!(
            slot_context(&config(5, 1), 1, 200_000_000, false, host).unwrap(),
            1
        );
        // On a GPU the budget is the GPU's free memory, and says so.
        let gpu = Memory {
            available: Some(1_000_000_000),
            gpu: true,
        };
        let e = slot_context(&config(2, 1000), 1000, 1_000_000, false, gpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("more than half the 1.0 GB of GPU memory available"),
            "{e}"
        );
        // Without a context asked for, the model's (4096 here) is capped
        // to fit; a device that does not say how much it has caps nothing.
        let model_context = |parallel, memory| {
            slot_context(
                &EngineConfig {
                    context: None,
                    ..config(parallel, 1)
                },
                4096,
                1_000_000,
                false,
                memory,
            )
        };
        assert_eq!(model_context(1, gpu).unwrap(), 500);
        let e = model_context(8, gpu).unwrap_err().to_string();
        assert!(e.contains("do not fit in GPU memory"), "{e}");
        let unknown = Memory {
            available: None,
            gpu: true,
        };
        assert_eq!(model_context(8, unknown).unwrap(), 4096);
    }
}
