//! Where a model is → the files that make it. Today a local directory; the
//! hub and GGUF files will resolve to the same `ModelFiles`.

use crate::tokenizer::TokenizerFiles;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Safetensors files; empty when the directory has none.
    pub weights: Vec<PathBuf>,
    pub tokenizer: TokenizerFiles,
    pub generation_config: Option<PathBuf>,
}

/// The files of a model directory in the Hugging Face layout.
pub fn local_dir(dir: &Path) -> Result<ModelFiles> {
    if !dir.exists() {
        bail!("model directory {} does not exist", dir.display());
    }
    if !dir.is_dir() {
        bail!(
            "{} is not a directory (expected a model directory with config.json)",
            dir.display()
        );
    }
    let file = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let Some(config) = file("config.json") else {
        bail!("{} has no config.json", dir.display());
    };
    let weights = if let Some(index) = file("model.safetensors.index.json") {
        crate::weights::shards_from_index(&index)?
    } else if let Some(single) = file("model.safetensors") {
        vec![single]
    } else {
        // Not an error yet: tokenizing needs no weights. Loading the model says so.
        Vec::new()
    };
    let tokenizer = TokenizerFiles {
        tokenizer_json: file("tokenizer.json"),
        sentencepiece_model: file("tokenizer.model"),
        tokenizer_config: file("tokenizer_config.json"),
        added_tokens: file("added_tokens.json"),
    };
    if tokenizer.tokenizer_json.is_none() && tokenizer.sentencepiece_model.is_none() {
        bail!(
            "no tokenizer: {} has neither tokenizer.json nor tokenizer.model",
            dir.display()
        );
    }
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        config,
        weights,
        tokenizer,
        generation_config: file("generation_config.json"),
    })
}
