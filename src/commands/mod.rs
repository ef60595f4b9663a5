//! One file per subcommand. Each is a client of the library: it gathers
//! input, calls the loader and the engine, and prints.

pub mod bench;
pub mod best_of;
pub mod chat;
pub mod input;
pub mod models;
pub mod quantize;
pub mod run;
pub mod score;
pub mod serve;
pub mod tokenize;

use crate::cli::{DeviceArgs, EngineArgs, ModelArgs};
use crate::engine::Engine;
use crate::loader::{self, GenerationConfig};
use crate::source::{self, ModelFiles, ModelSpec, hub::HubOptions};
use crate::template::Template;
use crate::tokenizer::TextTokenizer;
use anyhow::Result;
use std::sync::Arc;

/// The files of the model `--model` names (downloading it if needed), and
/// the template to use: `--template`, or for `auto` the one a known model
/// carries.
pub fn model_files(args: &ModelArgs) -> Result<(ModelFiles, String)> {
    let spec = ModelSpec::parse(&args.model)?.with_gguf_file(args.gguf_file.as_deref())?;
    if let ModelSpec::Hub(m) = &spec
        && let Some(k) = crate::source::known::by_repo(&m.repo).filter(|k| k.is_reward())
    {
        anyhow::bail!(
            "{} is a reward model, not a chat model: score with `starling score --model {}`, or pick answers with `run --best-of N --reward-model {}`",
            k.name,
            k.name,
            k.name
        );
    }
    let template = match (args.template.as_str(), spec.known_template()) {
        ("auto", Some(known)) => known.to_string(),
        (chosen, _) => chosen.to_string(),
    };
    let files = source::resolve(&spec, HubOptions::from_env(args.offline))?;
    Ok((files, template))
}

/// A model loaded and its engine started: what `run`, `chat` and `serve`
/// share.
pub struct Started {
    pub engine: Engine,
    pub tokenizer: Arc<TextTokenizer>,
    pub template: Template,
    /// Ids that end an answer (EOS, `<|end_of_turn|>`).
    pub stop_ids: Vec<u32>,
    pub generation: GenerationConfig,
    pub load_s: f64,
    /// The weights' move into memory, when one runs.
    pub resident: Option<crate::weights::resident::Mover>,
    /// The model as messages name it: its GGUF file, or its directory.
    pub origin: std::path::PathBuf,
}

/// Loads the model `--model` names on the device asked for and starts the
/// engine over it (`default_parallel` slots unless `--parallel` says).
pub fn start_engine(
    model: &ModelArgs,
    device: &DeviceArgs,
    engine: &EngineArgs,
    default_parallel: usize,
) -> Result<Started> {
    let (files, template) = model_files(model)?;
    start_engine_with(&files, &template, device, engine, default_parallel)
}

/// `start_engine` for files already resolved (`model_files`).
pub fn start_engine_with(
    files: &ModelFiles,
    template: &str,
    device: &DeviceArgs,
    engine: &EngineArgs,
    default_parallel: usize,
) -> Result<Started> {
    let on = loader::device(&device.device)?;
    let loaded = loader::load(
        files,
        template,
        device.dtype(),
        device.quantize,
        &on,
        device.keep_mapped,
    )?;
    let text = loaded.text;
    let tokenizer = Arc::new(text.tokenizer);
    let mut weights = loaded.model;
    device.apply_kv_type(&mut weights);
    let engine = Engine::start(
        weights,
        Some(tokenizer.clone()),
        engine.config(default_parallel),
    )?;
    Ok(Started {
        engine,
        tokenizer,
        template: text.template,
        stop_ids: text.stop_ids,
        generation: text.generation,
        load_s: loaded.load_s,
        resident: loaded.resident,
        origin: files.origin().to_path_buf(),
    })
}

/// Whether `e` is a write to a reader that went away (`| head`): not an
/// error worth a message.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The error chain as the one line the user sees: each cause's message,
/// joined by ": ". candle attaches a backtrace to its errors whenever
/// RUST_BACKTRACE is set (GPU images often set it), and its message then
/// carries the whole trace; only the error inside is kept. A cause longer
/// than [`MAX_CAUSE`] characters is cut: parsers (serde, safetensors) quote
/// the offending text, and a corrupt file can make that megabytes.
pub fn error_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|cause| {
            let mut candle = cause.downcast_ref::<candle_core::Error>();
            while let Some(candle_core::Error::WithBacktrace { inner, .. }) = candle {
                candle = Some(inner);
            }
            let text = candle.map_or_else(|| cause.to_string(), |c| c.to_string());
            let line = text.lines().next().unwrap_or_default();
            match line.char_indices().nth(MAX_CAUSE) {
                Some((cut, _)) => format!("{}…", &line[..cut]),
                None => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// The most characters one cause of an error shows.
pub const MAX_CAUSE: usize = 300;

#[cfg(test)]
mod tests {
    #[test]
    fn a_long_cause_is_cut() {
        let e = anyhow::anyhow!("x".repeat(10_000)).context("reading a file");
        let line = super::error_line(&e);
        assert!(line.starts_with("reading a file: xxx") && line.ends_with('…'));
        assert_eq!(
            line.chars().count(),
            "reading a file: ".len() + super::MAX_CAUSE + 1
        );
    }

    use super::*;

    #[test]
    fn an_error_with_a_candle_backtrace_reads_as_one_line() {
        let candle = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg(
                "the provided PTX was rejected".into(),
            )),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert!(
            candle.to_string().lines().count() > 1,
            "the trace is in the message"
        );
        let e = anyhow::Error::new(candle).context("loading the model from tiny");
        assert_eq!(
            error_line(&e),
            "loading the model from tiny: the provided PTX was rejected"
        );
    }
}
