//! The transformer: its configuration, the decoder, and its KV cache.

mod bf16;
pub mod config;
mod decoder;
mod kv_cache;
pub mod linear;
mod q4k;
mod q4k_panel;
mod q8_0;
mod q8_0_panel;
mod qmatmul;
pub mod synthetic;

pub use config::{Config, Family};
pub use decoder::{Logits, Model};
pub use kv_cache::KvCache;
