//! One file per subcommand. Each is a client of the library: it gathers
//! input, calls the loader and the engine, and prints.

pub mod bench;
pub mod chat;
pub mod input;
pub mod models;
pub mod quantize;
pub mod run;
pub mod tokenize;

use crate::cli::ModelArgs;
use crate::source::{self, ModelFiles, ModelSpec, hub::HubOptions};
use anyhow::Result;

/// The files of the model `--model` names (downloading it if needed), and
/// the template to use: `--template`, or for `auto` the one a known model
/// carries.
pub fn model_files(args: &ModelArgs) -> Result<(ModelFiles, String)> {
    let spec = ModelSpec::parse(&args.model)?.with_gguf_file(args.gguf_file.as_deref())?;
    let template = match (args.template.as_str(), spec.known_template()) {
        ("auto", Some(known)) => known.to_string(),
        (chosen, _) => chosen.to_string(),
    };
    let files = source::resolve(&spec, HubOptions::from_env(args.offline))?;
    Ok((files, template))
}
