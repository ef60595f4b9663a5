//! The transformer: its configuration, the decoder, its KV cache, and the
//! choice of matrix kind (dense, bf16, quantized) over the kernels.

pub mod config;
mod decoder;
mod kv_cache;
pub mod linear;
pub mod synthetic;

pub use config::{Config, Family};
pub use decoder::{Chunk, Head, Layout, Logits, Model, PREFILL_CHUNK, RopeLayout};
pub use kv_cache::KvCache;
