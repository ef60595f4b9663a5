//! Where a model is → the files that make it: a local directory, a known
//! name, or a hub repo (`owner/name[@revision]`), all resolved to a
//! directory in the Hugging Face layout.

pub mod hub;
pub mod known;

use crate::tokenizer::TokenizerFiles;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// What `--model` named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    Local(PathBuf),
    Hub(hub::HubModel),
}

impl ModelSpec {
    /// A path that exists wins; then a known name; then `owner/name[@rev]`,
    /// optionally with a GGUF quantization tag (`owner/name:Q4_K_M`);
    /// anything else that looks like a path is a (missing) directory.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let (spec, gguf) = match spec.rsplit_once(':') {
            Some((rest, tag))
                if !tag.is_empty()
                    && tag
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) =>
            {
                (rest, Some(hub::GgufChoice::Tag(tag.to_string())))
            }
            _ => (spec, None),
        };
        let (name, revision) = match spec.rsplit_once('@') {
            Some((n, r)) if !r.is_empty() && !r.contains('/') => (n, r.to_string()),
            _ => (spec, "main".to_string()),
        };
        if let Some(k) = known::by_name(name) {
            return Ok(Self::Hub(hub::HubModel {
                repo: k.repo.to_string(),
                revision,
                gguf,
            }));
        }
        // A name ending in .gguf is a file the user means, never a repo.
        let looks_like_path = spec.starts_with(['/', '.', '~'])
            || spec.contains('\\')
            || crate::weights::gguf::is_gguf(path);
        let parts: Vec<&str> = name.split('/').collect();
        let repo_like = parts.len() == 2
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            });
        if repo_like && !looks_like_path {
            return Ok(Self::Hub(hub::HubModel {
                repo: name.to_string(),
                revision,
                gguf,
            }));
        }
        if looks_like_path || parts.len() > 2 {
            return Ok(Self::Local(path.to_path_buf()));
        }
        bail!(
            "unknown model {spec:?}: not a directory, a known name ({}), or a hub repo owner/name",
            known::KNOWN
                .iter()
                .map(|k| k.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// Chooses a GGUF file of a hub repo by name (`--gguf-file`).
    pub fn with_gguf_file(self, file: Option<&str>) -> Result<Self> {
        match (self, file) {
            (spec, None) => Ok(spec),
            (Self::Hub(mut m), Some(f)) => {
                m.gguf = Some(hub::GgufChoice::File(f.to_string()));
                Ok(Self::Hub(m))
            }
            (Self::Local(p), Some(f)) => Ok(Self::Local(p.join(f))),
        }
    }

    /// The built-in template a known model was trained with.
    pub fn known_template(&self) -> Option<&'static str> {
        match self {
            Self::Hub(m) => known::by_repo(&m.repo).map(|k| k.template),
            Self::Local(_) => None,
        }
    }
}

/// The files of the model `spec` names, downloading a hub model if needed.
pub fn resolve(spec: &ModelSpec, options: hub::HubOptions) -> Result<ModelFiles> {
    match spec {
        ModelSpec::Local(dir) => local_dir_with(dir, options.parts),
        ModelSpec::Hub(model) => local_dir_with(&hub::resolve(model, options)?, options.parts),
    }
}

#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    /// `config.json`; `None` for a GGUF file, whose metadata holds the config.
    pub config: Option<PathBuf>,
    /// Weight files (safetensors, pickles, or one GGUF); empty when there are none.
    pub weights: Vec<PathBuf>,
    /// The GGUF file, when the model is one: config, tokenizer and template come from it.
    pub gguf: Option<PathBuf>,
    pub tokenizer: TokenizerFiles,
    pub generation_config: Option<PathBuf>,
}

impl ModelFiles {
    /// What to name in messages about the model: the GGUF file when the
    /// model is one (its directory may hold several), else the directory.
    pub fn origin(&self) -> &Path {
        self.gguf.as_deref().unwrap_or(&self.dir)
    }
}

/// Where a model's weights are, in order of preference: safetensors over
/// PyTorch pickles, each as a shard index (`true`) or a single file. Local
/// directories and hub downloads choose by the same list.
pub(crate) const WEIGHT_LAYOUTS: [(&str, bool); 4] = [
    ("model.safetensors.index.json", true),
    ("model.safetensors", false),
    ("pytorch_model.bin.index.json", true),
    ("pytorch_model.bin", false),
];

/// A single GGUF file: everything a run needs is inside it.
pub fn gguf_file(path: &Path) -> ModelFiles {
    ModelFiles {
        // A bare file name's parent is "": the current directory.
        dir: path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
        config: None,
        weights: vec![path.to_path_buf()],
        gguf: Some(path.to_path_buf()),
        tokenizer: TokenizerFiles::default(),
        generation_config: None,
    }
}

/// The `.gguf` files of a directory, sorted by name.
pub fn gguf_files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && crate::weights::gguf::is_gguf(p))
        .collect();
    found.sort();
    found
}

/// The files of a model directory in the Hugging Face layout, or of a GGUF
/// file (a path to one, or a directory holding exactly one and no config.json).
pub fn local_dir(dir: &Path) -> Result<ModelFiles> {
    local_dir_with(dir, hub::Parts::All)
}

/// The tokenizer files in `dir` (a model directory, or a tokenizer's alone).
pub fn tokenizer_dir(dir: &Path) -> Result<TokenizerFiles> {
    // A tokenizer.json or tokenizer.model named directly: that file, with
    // the tokenizer_config.json beside it.
    if dir.is_file() {
        let parent = dir.parent().unwrap_or(Path::new("."));
        let mut files = tokenizer_files(parent);
        match dir.extension().and_then(|e| e.to_str()) {
            Some("json") => {
                files.tokenizer_json = Some(dir.to_path_buf());
                files.sentencepiece_model = None;
            }
            Some("model") => {
                files.tokenizer_json = None;
                files.sentencepiece_model = Some(dir.to_path_buf());
            }
            _ => bail!(
                "{} is neither a tokenizer directory nor a tokenizer.json or tokenizer.model file",
                dir.display()
            ),
        }
        let named = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if named == "tokenizer_config.json" || named == "config.json" {
            bail!(
                "{} is not a tokenizer: give its directory, or tokenizer.json / tokenizer.model",
                dir.display()
            );
        }
        return Ok(files);
    }
    if !dir.is_dir() {
        bail!("tokenizer {} does not exist", dir.display());
    }
    let files = tokenizer_files(dir);
    if files.tokenizer_json.is_none() && files.sentencepiece_model.is_none() {
        bail!(
            "no tokenizer: {} has neither tokenizer.json nor tokenizer.model",
            dir.display()
        );
    }
    Ok(files)
}

/// The tokenizer of the model `spec` names, downloading only its tokenizer
/// files from the hub.
pub fn resolve_tokenizer(spec: &ModelSpec, options: hub::HubOptions) -> Result<TokenizerFiles> {
    match spec {
        ModelSpec::Local(dir) => tokenizer_dir(dir),
        ModelSpec::Hub(model) => tokenizer_dir(&hub::resolve(
            model,
            options.with_parts(hub::Parts::TokenizerOnly),
        )?),
    }
}

fn tokenizer_files(dir: &Path) -> TokenizerFiles {
    let file = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    TokenizerFiles {
        tokenizer_json: file("tokenizer.json"),
        sentencepiece_model: file("tokenizer.model"),
        tokenizer_config: file("tokenizer_config.json"),
        added_tokens: file("added_tokens.json"),
    }
}

/// Whether a config.json names a reward model's architecture.
fn is_reward_config(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    value["architectures"].as_array().is_some_and(|a| {
        a.iter().any(|x| {
            matches!(
                x.as_str(),
                Some("LLMForSequenceRegression" | "LlamaForSequenceClassification")
            )
        })
    })
}

/// `local_dir`, where `Parts::NoTokenizer` accepts a directory without one.
pub fn local_dir_with(dir: &Path, parts: hub::Parts) -> Result<ModelFiles> {
    let gguf_name = crate::weights::gguf::is_gguf(dir);
    if !dir.exists() {
        match gguf_name {
            true => bail!("model file {} does not exist", dir.display()),
            false => bail!("model directory {} does not exist", dir.display()),
        }
    }
    // A GGUF by its name, or by its first bytes whatever its name.
    if dir.is_file() && (gguf_name || crate::weights::gguf::has_magic(dir)) {
        return Ok(gguf_file(dir));
    }
    if gguf_name && !dir.is_dir() {
        bail!(
            "{} is not a regular file (a FIFO or a device?): a model must be a file that can be mapped",
            dir.display()
        );
    }
    if !dir.is_dir() {
        bail!(
            "{} is not a directory (expected a model directory with config.json, or a .gguf file)",
            dir.display()
        );
    }
    let file = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let Some(config) = file("config.json") else {
        return match gguf_files(dir).as_slice() {
            [one] => Ok(gguf_file(one)),
            [] => bail!("{} has no config.json (and no .gguf file)", dir.display()),
            many => bail!(
                "{} holds {} GGUF files; pass one of them with --model DIR/FILE.gguf: {}",
                dir.display(),
                many.len(),
                many.iter()
                    .filter_map(|p| p.file_name()?.to_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    };
    let weights = match WEIGHT_LAYOUTS
        .iter()
        .find_map(|&(name, sharded)| file(name).map(|path| (path, sharded)))
    {
        Some((index, true)) => crate::weights::shards_from_index(&index)?,
        Some((single, false)) => vec![single],
        // Not an error yet: tokenizing needs no weights. Loading the model says so.
        None => Vec::new(),
    };
    let tokenizer = tokenizer_files(dir);
    if parts != hub::Parts::NoTokenizer
        && tokenizer.tokenizer_json.is_none()
        && tokenizer.sentencepiece_model.is_none()
    {
        // Starling-RM-7B-alpha ships no tokenizer: say what it is.
        if is_reward_config(&config) {
            bail!(
                "{} is a reward model, not a chat model: score with `starling score`, or use it as `run --best-of N --reward-model`",
                dir.display()
            );
        }
        bail!(
            "no tokenizer: {} has neither tokenizer.json nor tokenizer.model",
            dir.display()
        );
    }
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        config: Some(config),
        weights,
        gguf: None,
        tokenizer,
        generation_config: file("generation_config.json"),
    })
}
