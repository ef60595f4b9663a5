//! The OpenAI request shapes the server reads (chat completions and raw
//! completions), checked and turned into engine requests. Only what
//! starling implements is read; an OpenAI field it does not implement is
//! refused by name when set to anything but its default, and fields
//! OpenAI does not define are ignored, as OpenAI's own server does.
//! Reference: <https://platform.openai.com/docs/api-reference/chat/create>.

use super::error::ApiError;
use crate::engine::SamplerConfig;
use crate::loader::GenerationConfig;
use crate::template::{Message, Template};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

/// A message's content: a string, or an array of parts of which only
/// text parts are understood.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Part {
    /// Only `text` parts are understood.
    #[serde(rename = "type")]
    #[schema(rename = "type", pattern = "^text$")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or `developer`, read as system).
    #[schema(pattern = "^(system|user|assistant|developer)$")]
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and length fields both endpoints share. The ranges in the
/// schema are the ones [`Sampling::settings`] enforces (a value outside
/// is a 400 naming the field).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct Sampling {
    /// The served model's name or an alias (left out: the served model).
    pub model: Option<String>,
    /// 0 is greedy. Default: generation_config.json's, else 1.
    #[schema(minimum = 0.0, maximum = 1e30)]
    pub temperature: Option<f64>,
    /// Nucleus sampling's probability mass. Default: generation_config.json's, else 1.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens; 0 is off.
    #[schema(minimum = 0)]
    pub top_k: Option<i64>,
    /// Drop tokens less likely than min_p times the most likely; 0 is off.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f64>,
    /// Most tokens to generate. Left out: to the end of the context. The
    /// prompt and max_tokens must fit the context.
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    /// The same as max_tokens (OpenAI's newer name); wins when both are given.
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<i64>,
    /// Up to 4 strings that end the answer (not included in it).
    pub stop: Option<Stop>,
    /// Seeds the sampler: the same seed gives the same answer for the same
    /// prompt (a near-tie may fall the other way when a kept prefix covered a
    /// different share of it). Choice i uses seed + i.
    pub seed: Option<u64>,
    /// Answers to generate; they share the prompt's prefill.
    #[schema(minimum = 1)]
    pub n: Option<i64>,
    /// Divides the logits of recently seen tokens (1 is off).
    #[schema(minimum = 0.001, maximum = 1000.0)]
    pub repetition_penalty: Option<f64>,
    /// OpenAI's presence penalty over the answer's own tokens.
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f64>,
    /// OpenAI's frequency penalty over the answer's own tokens.
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f64>,
    /// Chat: true for each token's log-probability. Completions: the number
    /// of alternatives (0 to 20).
    pub logprobs: Option<Value>,
    /// Chat: the alternatives per token (0 to 20); needs logprobs true.
    pub top_logprobs: Option<Value>,
    /// Token id (as a string) to a bias from -100 to 100 added to its logit.
    pub logit_bias: Option<Value>,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    // OpenAI fields starling does not implement: refused when set.
    /// Not supported: a 400 unless empty.
    pub tools: Option<Value>,
    /// Not supported: a 400 unless "none".
    pub tool_choice: Option<Value>,
    /// Not supported: a 400 unless empty.
    pub functions: Option<Value>,
    /// Not supported: a 400 unless "none".
    pub function_call: Option<Value>,
    /// Only `{"type": "text"}`.
    pub response_format: Option<Value>,
    /// Not supported: a 400 when set.
    pub audio: Option<Value>,
    /// Only `["text"]`.
    pub modalities: Option<Value>,
    /// Not supported: a 400 when set.
    pub prediction: Option<Value>,
    /// Not supported: a 400 when true.
    pub echo: Option<Value>,
    /// Only 1.
    pub best_of: Option<Value>,
    /// Not supported: a 400 unless empty.
    pub suffix: Option<Value>,
}

/// The JSON schemas of [`Sampling`]'s free-form fields: what starling
/// accepts in them (anything else is a 400 naming the field). The OpenAPI
/// document puts these in place of "any value" (see `server::openapi`).
pub const FREE_FORM_SCHEMAS: [(&str, &str); 14] = [
    (
        "logprobs",
        r#"{"oneOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 20}, {"type": "null"}]}"#,
    ),
    (
        "top_logprobs",
        r#"{"type": ["integer", "null"], "minimum": 0, "maximum": 20}"#,
    ),
    (
        "logit_bias",
        r#"{"type": ["object", "null"], "propertyNames": {"pattern": "^[0-9]{1,5}$"}, "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}"#,
    ),
    (
        "tools",
        r#"{"type": ["array", "null"], "maxItems": 0, "items": {}}"#,
    ),
    ("tool_choice", r#"{"enum": ["none", null]}"#),
    (
        "functions",
        r#"{"type": ["array", "null"], "maxItems": 0, "items": {}}"#,
    ),
    ("function_call", r#"{"enum": ["none", null]}"#),
    (
        "response_format",
        r#"{"oneOf": [{"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}}, {"type": "null"}]}"#,
    ),
    ("audio", r#"{"type": "null"}"#),
    (
        "modalities",
        r#"{"oneOf": [{"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1}, {"type": "null"}]}"#,
    ),
    ("prediction", r#"{"type": "null"}"#),
    ("echo", r#"{"enum": [false, null]}"#),
    ("best_of", r#"{"enum": [1, null]}"#),
    ("suffix", r#"{"enum": ["", null]}"#),
];

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// vLLM's name for options of the chat template. starling reads one:
    /// `{"mode": "code"}` (or `"chat"`) picks OpenChat's coding (or chat)
    /// format on a model whose template is OpenChat's; anything else is a 400.
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `prompt` of `/v1/completions`: text, or token ids.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// One prompt: text, or token ids.
pub enum OnePrompt {
    Text(String),
    Ids(Vec<u32>),
}

impl Prompt {
    /// The one prompt of the request: a list of one prompt is that prompt
    /// (LangChain sends `["text"]`); several prompts in one request are not
    /// taken (send one request each: the engine batches them all the same).
    pub fn single(self) -> Result<OnePrompt, ApiError> {
        let several = || {
            ApiError::invalid_param(
                "prompt",
                "one prompt per request (send each prompt as its own request)",
            )
        };
        match self {
            Prompt::Text(text) => Ok(OnePrompt::Text(text)),
            Prompt::Ids(ids) => Ok(OnePrompt::Ids(ids)),
            Prompt::Texts(mut list) if list.len() == 1 => Ok(OnePrompt::Text(list.remove(0))),
            Prompt::IdLists(mut list) if list.len() == 1 => Ok(OnePrompt::Ids(list.remove(0))),
            Prompt::Texts(_) | Prompt::IdLists(_) => Err(several()),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// What a request asks of the engine, checked.
#[derive(Debug)]
pub struct Settings {
    pub sampler: SamplerConfig,
    /// `None`: to the end of the context.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
}

/// Which endpoint a request came to: `logprobs` means different things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `logprobs: true` and `top_logprobs: 0..=20`.
    Chat,
    /// Legacy `logprobs: 0..=20` (OpenAI allows 5; vLLM more).
    Completion,
}

/// Most alternatives a token's log-probabilities list (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

impl Sampling {
    /// Checks every field and fills the left-out sampling values from the
    /// model's generation_config.json, else OpenAI's defaults (temperature
    /// 1, top_p 1, no top-k or min-p).
    ///
    /// `vocab` bounds the token ids `logit_bias` may name.
    pub fn settings(
        &self,
        generation: &GenerationConfig,
        endpoint: Endpoint,
        vocab: usize,
    ) -> Result<Settings, ApiError> {
        self.refuse_unimplemented()?;
        let logprobs = self.logprobs(endpoint)?;
        let logit_bias = self.logit_bias(vocab)?;
        let temperature = self.temperature.or(generation.temperature).unwrap_or(1.0);
        let top_p = self.top_p.or(generation.top_p).unwrap_or(1.0);
        let top_k = match self.top_k {
            Some(k) if k < 0 => return Err(ApiError::invalid_param("top_k", "top_k must be >= 0")),
            Some(k) => k as usize,
            None => generation.top_k.unwrap_or(0),
        };
        let repeat_penalty = match self.repetition_penalty {
            Some(p) => p as f32,
            None => generation.repetition_penalty.unwrap_or(1.0),
        };
        let sampler = SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p: self.min_p.unwrap_or(0.0),
            repeat_penalty,
            repeat_last_n: 64,
            presence_penalty: self.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0) as f32,
            logit_bias,
            seed: self.seed.unwrap_or_else(rand::random),
        };
        if let Some(p) = self.repetition_penalty
            && !(0.001..=1000.0).contains(&p)
        {
            return Err(ApiError::invalid_param(
                "repetition_penalty",
                "repetition_penalty must be between 0.001 and 1000 (1 = off)",
            ));
        }
        sampler.validate().map_err(|e| {
            let message = e.to_string();
            // The sampler's messages start with the field's name.
            let field = [
                "temperature",
                "top_p",
                "min_p",
                "presence_penalty",
                "frequency_penalty",
                "logit_bias",
            ]
            .into_iter()
            .find(|f| message.starts_with(f));
            match field {
                Some(f) => ApiError::invalid_param(f, message),
                None => ApiError::invalid(message),
            }
        })?;
        let (name, asked) = match self.max_completion_tokens {
            Some(m) => ("max_completion_tokens", Some(m)),
            None => ("max_tokens", self.max_tokens),
        };
        let max_tokens = match asked {
            None => None,
            Some(m) if m < 1 => {
                return Err(ApiError::invalid_param(
                    name,
                    format!("{name} must be at least 1"),
                ));
            }
            Some(m) => Some(m as usize),
        };
        let n = match self.n {
            None => 1,
            Some(n) if n < 1 => return Err(ApiError::invalid_param("n", "n must be at least 1")),
            Some(n) => n as usize,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::invalid_param("stop", "at most 4 stop sequences"));
        }
        Ok(Settings {
            sampler,
            max_tokens,
            stop,
            n,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            logprobs,
        })
    }

    /// How many alternatives per token, when log-probabilities are asked
    /// for: chat's `logprobs: true` with `top_logprobs`, or legacy
    /// completions' `logprobs: N`.
    fn logprobs(&self, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
        let count = |name: &str, v: &Value| match v.as_i64() {
            Some(n) if (0..=MAX_TOP_LOGPROBS).contains(&n) => Ok(n as usize),
            _ => Err(ApiError::invalid_param(
                name,
                format!("{name} must be an integer from 0 to {MAX_TOP_LOGPROBS}"),
            )),
        };
        let top = match &self.top_logprobs {
            None | Some(Value::Null) => None,
            Some(v) => Some(count("top_logprobs", v)?),
        };
        match endpoint {
            Endpoint::Chat => {
                let on = match &self.logprobs {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(ApiError::invalid_param(
                            "logprobs",
                            "logprobs must be true or false (top_logprobs says how many alternatives)",
                        ));
                    }
                };
                match (on, top) {
                    (true, top) => Ok(Some(top.unwrap_or(0))),
                    (false, Some(n)) if n > 0 => Err(ApiError::invalid_param(
                        "top_logprobs",
                        "top_logprobs needs logprobs set to true",
                    )),
                    (false, _) => Ok(None),
                }
            }
            Endpoint::Completion => {
                if top.is_some() {
                    return Err(ApiError::invalid_param(
                        "top_logprobs",
                        "completions take `logprobs: N` (the number of alternatives), not top_logprobs",
                    ));
                }
                match &self.logprobs {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => count("logprobs", v).map(Some),
                }
            }
        }
    }

    /// `logit_bias`: token ids (as JSON object keys) to a bias in [-100, 100].
    fn logit_bias(&self, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
        let map = match &self.logit_bias {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Object(map)) => map,
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    "logit_bias must be an object from token ids to numbers",
                ));
            }
        };
        let mut bias = Vec::with_capacity(map.len());
        for (key, value) in map {
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!("logit_bias key {key:?} is not a token id below {vocab}"),
                    )
                })?;
            let amount = value
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!("logit_bias for token {id} must be a number from -100 to 100"),
                    )
                })?;
            bias.push((id, amount as f32));
        }
        Ok(bias)
    }

    /// A field OpenAI defines and starling does not implement is a 400
    /// naming it, unless it holds its default (so `tools: []` passes): the
    /// values `FREE_FORM_SCHEMAS` admits, each of its own type. (Any empty
    /// or false value once passed for every field, so `modalities: false`,
    /// which the schema refuses, was answered.)
    fn refuse_unimplemented(&self) -> Result<(), ApiError> {
        let default = |v: &Option<Value>, ok: &dyn Fn(&Value) -> bool| {
            v.as_ref().is_none_or(|v| v.is_null() || ok(v))
        };
        let empty_list = |v: &Value| v.as_array().is_some_and(Vec::is_empty);
        let none = |v: &Value| v == "none";
        let never = |_: &Value| false;
        let text_format = |v: &Value| v.is_object() && v.get("type").is_some_and(|t| t == "text");
        let fields: [(&str, bool); 9] = [
            ("tools", !default(&self.tools, &empty_list)),
            ("tool_choice", !default(&self.tool_choice, &none)),
            ("functions", !default(&self.functions, &empty_list)),
            ("function_call", !default(&self.function_call, &none)),
            (
                "response_format",
                !default(&self.response_format, &text_format),
            ),
            ("audio", !default(&self.audio, &never)),
            (
                "modalities",
                !default(&self.modalities, &|v| v == &serde_json::json!(["text"])),
            ),
            ("prediction", !default(&self.prediction, &never)),
            ("echo", !default(&self.echo, &|v| v == &Value::Bool(false))),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, on)| *on) {
            return Err(ApiError::invalid_param(
                name,
                format!("`{name}` is not supported by this server"),
            ));
        }
        if self
            .best_of
            .as_ref()
            .is_some_and(|b| b != &Value::from(1) && !b.is_null())
        {
            return Err(ApiError::invalid_param(
                "best_of",
                "`best_of` is not supported by this server",
            ));
        }
        if self
            .suffix
            .as_ref()
            .is_some_and(|s| !s.is_null() && s != "")
        {
            return Err(ApiError::invalid_param(
                "suffix",
                "`suffix` is not supported by this server",
            ));
        }
        Ok(())
    }
}

impl ChatRequest {
    /// The template this request is rendered with: the served one, or
    /// OpenChat's other mode when `chat_template_kwargs.mode` asks for it.
    pub fn template(&self, served: &Template) -> Result<Template, ApiError> {
        let param = "chat_template_kwargs";
        let mode = match &self.chat_template_kwargs {
            None | Some(Value::Null) => return Ok(served.clone()),
            Some(Value::Object(map)) => match map.get("mode") {
                None | Some(Value::Null) if map.len() <= 1 => return Ok(served.clone()),
                Some(Value::String(m)) if map.len() == 1 => m.as_str(),
                _ => {
                    return Err(ApiError::invalid_param(
                        param,
                        "chat_template_kwargs takes one key: `mode` (\"chat\" or \"code\")",
                    ));
                }
            },
            Some(_) => {
                return Err(ApiError::invalid_param(
                    param,
                    "chat_template_kwargs must be an object",
                ));
            }
        };
        match (served, mode) {
            (Template::OpenChat | Template::OpenChatCode, "chat") => Ok(Template::OpenChat),
            (Template::OpenChat | Template::OpenChatCode, "code") => Ok(Template::OpenChatCode),
            (_, "chat" | "code") => Err(ApiError::invalid_param(
                param,
                format!(
                    "mode {mode:?} needs OpenChat's template; this model uses {}",
                    served.name()
                ),
            )),
            _ => Err(ApiError::invalid_param(
                param,
                format!("unknown mode {mode:?} (chat or code)"),
            )),
        }
    }

    /// The conversation as the template renders it. Message text is
    /// always text: a special token's name typed in it stays text.
    pub fn conversation(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "messages must not be empty",
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let param = format!("messages[{i}]");
                if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
                    return Err(ApiError::invalid_param(
                        &param,
                        format!("unsupported role {:?} (system, user, assistant)", m.role),
                    ));
                }
                let role = if m.role == "developer" { "system" } else { m.role.as_str() };
                let text = match &m.content {
                    // Only an assistant turn may come without content (OpenAI's rule).
                    None if role != "assistant" => {
                        return Err(ApiError::invalid_param(
                            &param,
                            format!("a {role} message needs its `content`"),
                        ));
                    }
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                ("text", None) => {
                                    return Err(ApiError::invalid_param(
                                        &param,
                                        "a text part needs its `text`",
                                    ));
                                }
                                (kind, _) => {
                                    return Err(ApiError::invalid_param(
                                        &param,
                                        format!("content part of type {kind:?} is not supported (text only)"),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                Ok(Message::new(role, text))
            })
            .collect()
    }
}

/// vLLM's `POST /tokenize`: either `prompt` (read as `/v1/completions`
/// reads it) or `messages` (rendered by the chat template).
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// With `prompt`: the tokenizer's BOS first (default true).
    pub add_special_tokens: Option<bool>,
    /// With `messages`: as in a chat request.
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<Value>,
}

/// vLLM's `POST /detokenize`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}
