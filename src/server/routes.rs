//! The routes: small async functions over the shared state. They only
//! check requests and queue them on the engine; the engine's step loop does
//! the work, and each answer's events come back through a channel (a
//! blocking forwarder per sequence, since the engine's handles are
//! synchronous). A client that goes away drops the channel, the forwarder
//! drops its handle, and the engine cancels the sequence at its next step.

use super::error::ApiError;
use super::openai::{
    ChatRequest, CompletionRequest, DetokenizeRequest, Endpoint, OnePrompt, Settings,
    TokenizeRequest,
};
use super::schema::{
    AssistantMessage, ChatChoice, ChatCompletion, Completion, CompletionChoice, Detokenized,
    ErrorBody, Health, ModelCard, ModelList, PromptTokensDetails, StreamEvent, Tokenized, Usage,
};
use crate::engine::{Engine, Event, GenerateRequest, Handle, Outcome, StopReason, TokenLogprobs};
use crate::loader::GenerationConfig;
use crate::template::Template;
use crate::tokenizer::TextTokenizer;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// What every route shares: the engine and what turns requests into ids.
pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Arc<TextTokenizer>,
    pub template: Template,
    pub stop_ids: Vec<u32>,
    pub generation: GenerationConfig,
    /// The served model's id first, then its aliases.
    pub names: Vec<String>,
    pub api_keys: Vec<String>,
    /// Most sequences that may wait for a slot; more is a 429.
    pub max_queue: Option<usize>,
    pub metrics: super::metrics::Metrics,
    /// Random per process: response ids do not repeat after a restart.
    pub run_id: u32,
    pub next_id: AtomicU64,
    /// Set on SIGTERM: `/health` says 503 so balancers stop sending.
    pub draining: std::sync::atomic::AtomicBool,
    /// Set when the shutdown timeout is over: every sequence ends at the
    /// engine's next step (streams still get their last chunk and `[DONE]`).
    pub cutoff: std::sync::atomic::AtomicBool,
    /// Generation requests being answered (a stream until its last event):
    /// the drain waits for this to reach 0.
    pub in_flight: std::sync::atomic::AtomicUsize,
}

/// Counts a generation request in flight while it lives.
struct InFlight(Shared);

impl InFlight {
    fn new(state: &Shared) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tokens a response served, for the request log.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    pub prompt: usize,
    pub completion: usize,
}

pub type Shared = Arc<AppState>;

/// A request's identity for its log line (set by the logging middleware).
#[derive(Debug, Clone)]
pub struct RequestLog {
    pub id: u64,
    pub method: String,
    pub path: String,
    pub start: std::time::Instant,
}

impl RequestLog {
    /// The request's one line on stderr.
    pub fn line(&self, status: u16, extra: &str) {
        eprintln!(
            "request id={} method={} path={} status={status}{extra} ms={}",
            self.id,
            self.method,
            self.path,
            self.start.elapsed().as_millis()
        );
    }
}

/// Marks a streamed response: its log line is written when it ends.
#[derive(Debug, Clone, Copy)]
pub struct Streaming;

/// 200 when ready; 503 while draining (and, from the loading server,
/// while the model loads).
#[utoipa::path(get, path = "/health", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Loading or draining", body = ErrorBody),
    ))]
pub async fn health(State(state): State<Shared>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return ApiError::unavailable("the server is shutting down").into_response();
    }
    Json(Health {
        status: "ok".into(),
    })
    .into_response()
}

/// The served model under its name and each alias.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses(
        (status = 200, body = ModelList),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn models(State(state): State<Shared>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: state.names.iter().map(|n| ModelCard::new(n)).collect(),
    })
}

/// One model by its name or alias.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "The model's name or alias")),
    responses(
        (status = 200, body = ModelCard),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn model(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    check_model(&state, Some(&id))?;
    Ok(Json(ModelCard::new(&id)))
}

/// vLLM's `/tokenize`: the ids the model sees for `prompt` or `messages`.
#[utoipa::path(post, path = "/tokenize", tag = "vllm", request_body = TokenizeRequest,
    responses(
        (status = 200, body = Tokenized),
        (status = 400, description = "Invalid JSON or values", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn tokenize(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: TokenizeRequest = parse(body)?;
    check_model(&state, request.model.as_deref())?;
    if request
        .chat_template_kwargs
        .as_ref()
        .is_some_and(|k| !k.is_object() && !k.is_null())
    {
        return Err(ApiError::invalid_param(
            "chat_template_kwargs",
            "chat_template_kwargs must be an object",
        ));
    }
    let ids = match (request.prompt, request.messages) {
        (Some(prompt), None) => state
            .tokenizer
            .inner()
            .encode(prompt.as_str(), request.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::invalid_param("prompt", format!("tokenizing the prompt: {e}")))?
            .get_ids()
            .to_vec(),
        (None, Some(messages)) => {
            let chat = ChatRequest {
                messages,
                chat_template_kwargs: request.chat_template_kwargs,
                sampling: Default::default(),
            };
            chat.template(&state.template)?
                .encode(&state.tokenizer, &chat.conversation()?)
                .map_err(|e| ApiError::invalid_param("messages", format!("{e:#}")))?
        }
        _ => return Err(ApiError::invalid("give either `prompt` or `messages`")),
    };
    Ok(Json(Tokenized {
        count: ids.len(),
        max_model_len: state.engine.context(),
        tokens: ids,
    })
    .into_response())
}

/// vLLM's `/detokenize`: the text of `tokens`.
#[utoipa::path(post, path = "/detokenize", tag = "vllm", request_body = DetokenizeRequest,
    responses(
        (status = 200, body = Detokenized),
        (status = 400, description = "Invalid JSON or values", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn detokenize(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: DetokenizeRequest = parse(body)?;
    check_model(&state, request.model.as_deref())?;
    let vocab = state.tokenizer.vocab_size() as u32;
    if let Some(bad) = request.tokens.iter().find(|&&id| id >= vocab) {
        return Err(ApiError::invalid_param(
            "tokens",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let text = state
        .tokenizer
        .decode(&request.tokens)
        .map_err(|e| ApiError::invalid_param("tokens", format!("{e:#}")))?;
    Ok(Json(Detokenized { prompt: text }).into_response())
}

/// Prometheus text (OpenMetrics) under vLLM's metric names.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text",
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)))]
pub async fn metrics(State(state): State<Shared>) -> Response {
    let text = state.metrics.render(&state.engine);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The OpenAPI document of this server (see [`super::openapi`]).
pub async fn openapi(State(state): State<Shared>) -> Json<Value> {
    Json(super::openapi::document(&state.names))
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route", "not_found")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::invalid("this route does not take that method")
        .with_status(axum::http::StatusCode::METHOD_NOT_ALLOWED)
}

/// A chat answer: the conversation through the model's chat template.
/// With `stream`, server-sent events of `chat.completion.chunk` objects
/// end with `data: [DONE]`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = ChatRequest,
    responses(
        (status = 200, description = "The answer", content(
            (ChatCompletion = "application/json"),
            (StreamEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid JSON or values", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 429, description = "The queue is full (Retry-After)", body = ErrorBody),
        (status = 503, description = "The model is loading (Retry-After)", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn chat_completions(
    State(state): State<Shared>,
    log: Option<Extension<RequestLog>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse(body)?;
    check_model(&state, request.sampling.model.as_deref())?;
    let settings = request.sampling.settings(
        &state.generation,
        Endpoint::Chat,
        state.tokenizer.vocab_size(),
    )?;
    let messages = request.conversation()?;
    let template = request.template(&state.template)?;
    let prompt = template
        .encode(&state.tokenizer, &messages)
        .map_err(|e| ApiError::invalid_param("messages", format!("{e:#}")))?;
    let log = log.map(|Extension(l)| l);
    answer(
        state,
        prompt,
        settings,
        Kind::Chat,
        request.sampling.model,
        log,
    )
    .await
}

/// A raw prompt, no template. Its text is the caller's whole prompt, so
/// special-token text in it IS read as special tokens: the one place
/// starling does so (chat messages never).
#[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CompletionRequest,
    responses(
        (status = 200, description = "The continuation", content(
            (Completion = "application/json"),
            (StreamEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid JSON or values", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 429, description = "The queue is full (Retry-After)", body = ErrorBody),
        (status = 503, description = "The model is loading (Retry-After)", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn completions(
    State(state): State<Shared>,
    log: Option<Extension<RequestLog>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse(body)?;
    check_model(&state, request.sampling.model.as_deref())?;
    let settings = request.sampling.settings(
        &state.generation,
        Endpoint::Completion,
        state.tokenizer.vocab_size(),
    )?;
    let prompt = match request.prompt.single()? {
        OnePrompt::Ids(ids) => {
            let vocab = state.tokenizer.vocab_size() as u32;
            if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            ids
        }
        OnePrompt::Text(text) => state
            .tokenizer
            .inner()
            .encode(text.as_str(), true)
            .map_err(|e| ApiError::invalid_param("prompt", format!("tokenizing the prompt: {e}")))?
            .get_ids()
            .to_vec(),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    let log = log.map(|Extension(l)| l);
    answer(
        state,
        prompt,
        settings,
        Kind::Completion,
        request.sampling.model,
        log,
    )
    .await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::invalid(e.body_text()).with_status(e.status()))?;
    serde_json::from_slice(&body).map_err(|e| {
        // serde names this crate's types; say what the client sent instead.
        let message = e
            .to_string()
            .replace("struct ChatRequest", "a chat completion request object")
            .replace("struct CompletionRequest", "a completion request object")
            .replace("struct StreamOptions", "an object")
            .replace(
                "untagged enum Content",
                "a string or an array of text parts",
            )
            .replace(
                "untagged enum Prompt",
                "a string, an array of token ids, or a list of one of those",
            )
            .replace("untagged enum Stop", "a string or an array of strings")
            .replace("data did not match any variant of ", "expected ");
        ApiError::invalid(format!("invalid request body: {message}"))
    })
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !state.names.iter().any(|n| n == m) => Err(ApiError::not_found(
            format!(
                "the model `{m}` does not exist; this server serves `{}`",
                state.names[0]
            ),
            "model_not_found",
        )),
        _ => Ok(()),
    }
}

/// Queues the answers and returns them, streamed or whole.
async fn answer(
    state: Shared,
    prompt: Vec<u32>,
    settings: Settings,
    kind: Kind,
    asked: Option<String>,
    log: Option<RequestLog>,
) -> Result<Response, ApiError> {
    let context = state.engine.context();
    let prompt_param = if kind == Kind::Chat {
        "messages"
    } else {
        "prompt"
    };
    // A prompt that alone is over the context is the prompt's fault, whatever max_tokens says.
    if prompt.len() > context {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid_param(
                prompt_param,
                format!(
                    "the prompt is {} tokens, longer than the model's context of {context}",
                    prompt.len()
                ),
            )
        });
    }
    let max_tokens = match settings.max_tokens {
        // The last token is never fed: prompt + max_tokens - 1 positions.
        Some(m) if prompt.len() + m - 1 > context => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!(
                    "the prompt ({} tokens) and max_tokens ({m}) exceed the context of {context} tokens",
                    prompt.len()
                ),
            ));
        }
        Some(m) => m,
        None => (context + 1).saturating_sub(prompt.len()).max(1),
    };
    // Sequences that would wait for a slot, this request's included.
    let load = state.engine.load();
    let would_wait =
        (load.waiting() + load.running() + settings.n).saturating_sub(state.engine.parallel());
    if let Some(max) = state.max_queue
        && would_wait > max
    {
        return Err(ApiError {
            kind: "rate_limit_error",
            ..ApiError::invalid(format!(
                "the queue is full ({} waiting, at most {max}): retry shortly",
                state.engine.load().waiting()
            ))
        }
        .with_status(axum::http::StatusCode::TOO_MANY_REQUESTS));
    }
    let arrived = log
        .as_ref()
        .map_or_else(std::time::Instant::now, |l| l.start);
    let prompt_tokens = prompt.len();
    let request = GenerateRequest {
        prompt,
        sampling: settings.sampler.clone(),
        max_tokens,
        stop_ids: state.stop_ids.clone(),
        stop_texts: settings.stop.clone(),
        continuation: kind == Kind::Completion,
        logprobs: settings.logprobs,
    };
    let handles = state.engine.submit_n(request, settings.n).map_err(|e| {
        let message = format!("{e:#}");
        if message.contains("longer than the model's context") {
            ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid_param(prompt_param, message)
            }
        } else if message.starts_with("n must") {
            ApiError::invalid_param("n", message)
        } else {
            ApiError::invalid(message)
        }
    })?;
    let in_flight = InFlight::new(&state);
    let events = forward(&state, handles, arrived);
    // Unique across restarts too: a random prefix per process, then a count.
    let id = format!(
        "{}-{:08x}{:06}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        state.run_id,
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let reply = Reply {
        id,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        // The name the client used (the alias, if it asked by it).
        model: asked.unwrap_or_else(|| state.names[0].clone()),
        kind,
        n: settings.n,
        prompt_tokens,
        tokenizer: state.tokenizer.clone(),
    };
    if settings.stream {
        Ok(stream(
            reply,
            events,
            settings.include_usage,
            log,
            in_flight,
        ))
    } else {
        let response = whole(reply, events).await;
        drop(in_flight);
        response
    }
}

/// Each handle's events, tagged with its choice index, on one channel.
/// Every finished answer is counted in the metrics here, whether its
/// client stayed (an answer cut short counts as `abort`).
fn forward(
    state: &Shared,
    handles: Vec<Handle>,
    arrived: std::time::Instant,
) -> mpsc::Receiver<(usize, Event)> {
    let (tx, rx) = mpsc::channel(256);
    for (i, handle) in handles.into_iter().enumerate() {
        let tx = tx.clone();
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let mut first = true;
            loop {
                // Wakes now and then while no event comes (a request waiting
                // for a slot): a client that left, or the shutdown cut-off,
                // ends the sequence even before it starts.
                let event = match handle.recv_timeout(std::time::Duration::from_millis(50)) {
                    Ok(Some(event)) => event,
                    Ok(None) => {
                        if tx.is_closed() || state.cutoff.load(Ordering::Relaxed) {
                            handle.cancel();
                        }
                        continue;
                    }
                    Err(_) => return,
                };
                match &event {
                    Event::Token { .. } => {
                        let ttft = first.then(|| arrived.elapsed().as_secs_f64());
                        state.metrics.token(ttft);
                        first = false;
                    }
                    Event::Finished(outcome) => state
                        .metrics
                        .observe(outcome, arrived.elapsed().as_secs_f64()),
                    _ => {}
                }
                let last = matches!(event, Event::Finished(_) | Event::Failed(_));
                // The client went away: the sequence ends at the next step
                // (its last events still reach the metrics).
                if tx.blocking_send((i, event)).is_err() || state.cutoff.load(Ordering::Relaxed) {
                    handle.cancel();
                }
                if last {
                    return;
                }
            }
        });
    }
    rx
}

struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    n: usize,
    prompt_tokens: usize,
    tokenizer: Arc<TextTokenizer>,
}

/// One choice's tokens with their log-probabilities, as they came.
type Scored = Vec<(u32, TokenLogprobs)>;

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::EndToken | StopReason::StopText => "stop",
        // Cut short (the shutdown cut-off; a client that left sees nothing):
        // vLLM's reason for it, so nobody takes the answer for complete.
        StopReason::Interrupted => "abort",
    }
}

impl Reply {
    fn usage(&self, outcomes: &[Option<Outcome>]) -> Usage {
        let completion: usize = outcomes.iter().flatten().map(|o| o.stats.gen_tokens).sum();
        let cached = outcomes
            .first()
            .and_then(|o| o.as_ref())
            .map_or(0, |o| o.stats.cached_tokens);
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            total_tokens: self.prompt_tokens + completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// One streamed chunk for choice `index`: its text (or the role, for
    /// the first chat chunk) and its finish reason.
    fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        role: bool,
        finish: Option<&str>,
        logprobs: Value,
    ) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice],
        })
    }

    /// A token's text and bytes as logprobs show them: text that is not
    /// whole UTF-8 (one byte of a character) is written `bytes:\xNN…`, as
    /// vLLM writes it; `bytes` always holds the real bytes.
    fn token(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.tokenizer.token_bytes(id);
        let text = match std::str::from_utf8(&bytes) {
            Ok(text) => text.to_string(),
            Err(_) => {
                let mut text = String::from("bytes:");
                for b in &bytes {
                    text.push_str(&format!("\\x{b:02x}"));
                }
                text
            }
        };
        (text, bytes)
    }

    /// `scored` in the endpoint's shape (`Null` when none were asked
    /// for): chat's `{"content": [{token, logprob, bytes, top_logprobs}]}`
    /// or legacy completions' parallel lists, whose `text_offset`s count
    /// characters from `offset` (where this part of the text starts).
    fn logprobs(&self, scored: Option<&[(u32, TokenLogprobs)]>, offset: &mut usize) -> Value {
        let Some(scored) = scored else {
            return Value::Null;
        };
        match self.kind {
            Kind::Chat => {
                let entry = |id: u32, logprob: f32| {
                    let (token, bytes) = self.token(id);
                    json!({"token": token, "logprob": logprob, "bytes": bytes})
                };
                let content: Vec<Value> = scored
                    .iter()
                    .map(|(id, lp)| {
                        let mut e = entry(*id, lp.logprob);
                        e["top_logprobs"] = lp.top.iter().map(|&(i, l)| entry(i, l)).collect();
                        e
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Kind::Completion => {
                let mut tokens = Vec::with_capacity(scored.len());
                let mut values = Vec::with_capacity(scored.len());
                let mut tops = Vec::with_capacity(scored.len());
                let mut offsets = Vec::with_capacity(scored.len());
                for (id, lp) in scored {
                    let (token, _) = self.token(*id);
                    offsets.push(*offset);
                    *offset += token.chars().count();
                    tokens.push(token);
                    values.push(lp.logprob);
                    let top: serde_json::Map<String, Value> = lp
                        .top
                        .iter()
                        .map(|&(i, l)| (self.token(i).0, l.into()))
                        .collect();
                    tops.push(top);
                }
                json!({"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
            }
        }
    }
}

/// The whole answer as one JSON body.
async fn whole(
    reply: Reply,
    mut events: mpsc::Receiver<(usize, Event)>,
) -> Result<Response, ApiError> {
    let mut outcomes: Vec<Option<Outcome>> = (0..reply.n).map(|_| None).collect();
    let mut scored: Vec<Scored> = (0..reply.n).map(|_| Vec::new()).collect();
    let mut asked_logprobs = false;
    while let Some((i, event)) = events.recv().await {
        match event {
            Event::Finished(outcome) => outcomes[i] = Some(outcome),
            Event::Failed(e) => return Err(ApiError::internal(format!("{e:#}"))),
            Event::Token {
                id,
                logprobs: Some(lp),
            } => {
                asked_logprobs = true;
                scored[i].push((id, lp));
            }
            Event::Token { .. } | Event::Text(_) => {}
        }
    }
    let mut chat = Vec::new();
    let mut text = Vec::new();
    for (i, outcome) in outcomes.iter().enumerate() {
        let Some(o) = outcome else {
            return Err(ApiError::internal(
                "the engine stopped before the answer was finished",
            ));
        };
        let finish_reason = finish_reason(o.stop).to_string();
        let logprobs = asked_logprobs.then(|| reply.logprobs(Some(&scored[i]), &mut 0));
        match reply.kind {
            Kind::Chat => chat.push(ChatChoice {
                index: i,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content: o.text.clone(),
                },
                logprobs,
                finish_reason,
            }),
            Kind::Completion => text.push(CompletionChoice {
                index: i,
                text: o.text.clone(),
                logprobs,
                finish_reason,
            }),
        }
    }
    let served = Served {
        prompt: reply.prompt_tokens,
        completion: outcomes.iter().flatten().map(|o| o.stats.gen_tokens).sum(),
    };
    let usage = reply.usage(&outcomes);
    let object = reply.object(false).to_string();
    let mut response = match reply.kind {
        Kind::Chat => Json(ChatCompletion {
            id: reply.id,
            object,
            created: reply.created,
            model: reply.model,
            choices: chat,
            usage,
        })
        .into_response(),
        Kind::Completion => Json(Completion {
            id: reply.id,
            object,
            created: reply.created,
            model: reply.model,
            choices: text,
            usage,
        })
        .into_response(),
    };
    response.extensions_mut().insert(served);
    Ok(response)
}

/// The answer as server-sent events, as OpenAI streams it: the role first
/// (chat), content deltas (whole UTF-8, never a possible stop text's
/// start: the engine holds those back), a chunk with the finish reason per
/// choice, the usage when asked, then `[DONE]`.
fn stream(
    reply: Reply,
    mut events: mpsc::Receiver<(usize, Event)>,
    include_usage: bool,
    log: Option<RequestLog>,
    in_flight: InFlight,
) -> Response {
    let (tx, rx) = mpsc::channel::<SseEvent>(256);
    tokio::spawn(async move {
        let _in_flight = in_flight;
        // The stream's log line when it ends, however it ends.
        struct Ended(Option<RequestLog>, usize, usize, &'static str);
        impl Drop for Ended {
            fn drop(&mut self) {
                if let Some(log) = self.0.take() {
                    let extra = format!(
                        " stream={} prompt_tokens={} completion_tokens={}",
                        self.3, self.1, self.2
                    );
                    log.line(200, &extra);
                }
            }
        }
        let mut ended = Ended(log, reply.prompt_tokens, 0, "client_left");
        let send = |value: Value| SseEvent::default().data(value.to_string());
        let mut started = vec![false; reply.n];
        let mut outcomes: Vec<Option<Outcome>> = (0..reply.n).map(|_| None).collect();
        // Tokens scored since the choice's last chunk (they go with the
        // next chunk), and where its text stands in characters.
        let mut scored: Vec<Option<Scored>> = (0..reply.n).map(|_| None).collect();
        let mut offsets = vec![0usize; reply.n];
        while let Some((i, event)) = events.recv().await {
            let chunk = match event {
                Event::Token {
                    id,
                    logprobs: Some(lp),
                } => {
                    ended.2 += 1;
                    scored[i].get_or_insert_with(Vec::new).push((id, lp));
                    continue;
                }
                Event::Token { .. } => {
                    ended.2 += 1;
                    continue;
                }
                Event::Text(piece) => {
                    let role = reply.kind == Kind::Chat && !started[i];
                    started[i] = true;
                    let logprobs = reply.logprobs(scored[i].as_deref(), &mut offsets[i]);
                    if let Some(s) = scored[i].as_mut() {
                        s.clear();
                    }
                    reply.chunk(i, Some(&piece), role, None, logprobs)
                }
                Event::Finished(outcome) => {
                    let role = reply.kind == Kind::Chat && !started[i];
                    // Tokens whose text never came (a stop string's) still
                    // count: their log-probabilities close the choice.
                    let logprobs = match scored[i].take() {
                        Some(s) if !s.is_empty() => reply.logprobs(Some(&s), &mut offsets[i]),
                        _ => Value::Null,
                    };
                    let chunk = reply.chunk(
                        i,
                        role.then_some(""),
                        role,
                        Some(finish_reason(outcome.stop)),
                        logprobs,
                    );
                    outcomes[i] = Some(outcome);
                    chunk
                }
                Event::Failed(e) => {
                    ended.3 = "failed";
                    let error = ApiError::internal(format!("{e:#}"));
                    let _ = tx.send(send(json!(error.body()))).await;
                    return;
                }
            };
            // The client went away: dropping `events` cancels the sequences.
            if tx.send(send(chunk)).await.is_err() {
                return;
            }
        }
        if include_usage {
            let usage = json!({
                "id": reply.id, "object": reply.object(true), "created": reply.created,
                "model": reply.model, "choices": [], "usage": reply.usage(&outcomes),
            });
            let _ = tx.send(send(usage)).await;
        }
        if tx.send(SseEvent::default().data("[DONE]")).await.is_ok() {
            ended.3 = "done";
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    let mut response = Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response();
    response.extensions_mut().insert(Streaming);
    response
}
