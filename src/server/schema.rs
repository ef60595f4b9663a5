//! The response bodies the server sends whole, as types: the routes
//! serialise these, and the OpenAPI document (`/openapi.json`) describes
//! them from the same definitions, so the two cannot drift apart.
//! Shapes follow OpenAI's API reference
//! (<https://platform.openai.com/docs/api-reference/chat/object>) and
//! vLLM's for `/tokenize` and `/detokenize`.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// `{"error": {...}}`, as OpenAI sends every failure.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// `model_not_found`, `context_length_exceeded`, `invalid_api_key`, ...
    pub code: Option<String>,
}

/// Token counts of a response (all its choices together).
#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens found in a kept KV cache prefix (not computed again).
    pub cached_tokens: usize,
}

/// `chat.completion`: the whole answer of `POST /v1/chat/completions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    /// `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`
    /// when `logprobs` was asked for.
    pub logprobs: Option<Value>,
    /// `stop` (end token or stop string) or `length` (max_tokens or the context).
    pub finish_reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: String,
    pub content: String,
}

/// `text_completion`: the whole answer of `POST /v1/completions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// `text_completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    /// `{tokens, token_logprobs, top_logprobs, text_offset}` when `logprobs` was asked for.
    pub logprobs: Option<Value>,
    pub finish_reason: String,
}

/// `GET /v1/models`: the served model under its name and each alias.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// `model`.
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

impl ModelCard {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            object: "model".into(),
            created: 0,
            owned_by: "starling".into(),
        }
    }
}

/// `POST /tokenize` (vLLM's shape).
#[derive(Debug, Serialize, ToSchema)]
pub struct Tokenized {
    pub count: usize,
    /// The context, in tokens.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` (vLLM's shape).
#[derive(Debug, Serialize, ToSchema)]
pub struct Detokenized {
    pub prompt: String,
}

/// `GET /health` when ready.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// One server-sent event of a streamed answer: `data` is a JSON chunk
/// (`chat.completion.chunk` or `text_completion`, the usage chunk last when
/// `stream_options.include_usage` is set), an error object, or `[DONE]`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamEvent {
    pub data: String,
    /// Absent (the default `message` event).
    pub event: Option<String>,
}
