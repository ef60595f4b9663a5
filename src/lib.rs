//! starling: run Starling and other Mistral/Llama-style chat models locally.
//!
//! The modules follow a request's path: [`source`] (which files) →
//! [`weights`] and [`tokenizer`] → [`model`] (over [`kernels`]) → [`template`] → [`engine`]
//! (session, sampler, streaming) → [`commands`] (the CLI's front ends).

pub mod cli;
pub mod commands;
pub mod engine;
pub mod kernels;
pub mod loader;
pub mod model;
pub mod reward;
pub mod server;
pub mod source;
pub mod template;
pub mod tokenizer;
pub mod weights;
