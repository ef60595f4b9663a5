//! `starling serve`: loads the model once, starts the engine, and serves
//! the OpenAI-compatible API until SIGINT or SIGTERM.

use crate::cli::ServeArgs;
use crate::server::{self, Listen, routes::AppState};
use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::time::Duration;

pub fn run(args: &ServeArgs) -> Result<()> {
    let mut api_keys = args.api_keys.clone();
    if let Ok(key) = std::env::var("STARLING_API_KEY")
        && !key.is_empty()
    {
        api_keys.push(key);
    }
    let load = || -> Result<AppState> {
        let started = super::start_engine(&args.model, &args.device, &args.engine, 4)?;
        eprintln!("starling serve: {}", started.engine.describe());
        // The model's id: the last part of what --model named (a file's or a
        // directory's name, a repo's name), as llama.cpp's server names it.
        let id = args
            .model
            .model
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(&args.model.model)
            .to_string();
        let mut names = vec![id];
        names.extend(args.alias.clone());
        let metrics = crate::server::metrics::Metrics::new(&names[0]);
        let state = AppState {
            engine: started.engine,
            tokenizer: started.tokenizer,
            template: started.template,
            stop_ids: started.stop_ids,
            generation: started.generation,
            names,
            api_keys,
            max_queue: args.max_queue,
            metrics,
            run_id: rand::random(),
            next_id: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            cutoff: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        };
        Ok(state)
    };
    server::serve(
        Listen {
            host: args.host.clone(),
            port: args.port,
            max_body: args.max_body,
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
            cors_origins: args.cors_origins.clone(),
            web: !args.no_web,
        },
        load,
    )
}
