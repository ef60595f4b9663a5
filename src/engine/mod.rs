//! Everything after the model is loaded: the session that owns the cache,
//! the sampler, the streaming detokenizer, stop texts, and the loop that
//! ties them together. The CLI, the REPL and any future server are clients
//! of this API; none of them reaches into the model.

pub mod chat;
pub mod detokenizer;
pub mod generate;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod session;
pub mod stop;

pub use chat::{Chat, ChatSettings, TurnReport};
pub use detokenizer::StreamDecoder;
pub use generate::{Outcome, Request, Stats, StopReason, generate};
pub use request::{Event, GenerateRequest, Handle, Probe};
pub use sampler::{Sampler, SamplerConfig, TokenLogprobs};
pub use scheduler::{DEFAULT_BATCH_TOKENS, Engine, EngineConfig, EngineLoad};
pub use session::{Prefill, Session};
