//! Models from the Hugging Face hub, cached in the layout Python's
//! huggingface_hub shares (`$HF_HOME/hub/models--owner--name/...`).
//!
//! A hub model resolves to its snapshot directory, which then reads like
//! any local model directory. hf-hub does the transfers (with resumable
//! `.part` files); safetensors are preferred, PyTorch `.bin` files are the
//! fallback; this module adds what hf-hub lacks: `HF_HUB_CACHE`,
//! `HF_TOKEN` and `HF_HUB_OFFLINE`, choosing the files to fetch, a check
//! that the cache already holds a complete model (so a cached model starts
//! without any network), and errors a user can act on.

use anyhow::{Context, Result, bail};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Files of a repo starling reads besides the weights, when present.
const SIDE_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "added_tokens.json",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    pub repo: String,
    pub revision: String,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct HubOptions {
    /// Use only the cache (`--offline` or `HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubOptions {
    pub fn from_env(offline_flag: bool) -> Self {
        let env = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"));
        Self {
            offline: offline_flag || env,
        }
    }
}

/// The hub cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(PathBuf::from(dir)),
        None => Cache::from_env(),
    }
}

fn repo_handle(model: &HubModel) -> Repo {
    Repo::with_revision(model.repo.clone(), RepoType::Model, model.revision.clone())
}

/// The directory of `repo` in the cache.
pub fn repo_dir(repo: &str) -> PathBuf {
    cache()
        .path()
        .join(format!("models--{}", repo.replace('/', "--")))
}

/// The snapshot directory holding a complete model, downloading what is missing.
pub fn resolve(model: &HubModel, options: HubOptions) -> Result<PathBuf> {
    if let Some(dir) = cached_snapshot(model) {
        return Ok(dir);
    }
    if options.offline {
        bail!(
            "offline: {}@{} is not (completely) in the cache at {}; run `starling pull {}` with network access first",
            model.repo,
            model.revision,
            cache().path().display(),
            model.repo
        );
    }
    download(model)
}

/// A cached snapshot of `model` that has everything a run needs, if any.
fn cached_snapshot(model: &HubModel) -> Option<PathBuf> {
    let config = cache().repo(repo_handle(model)).get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    let files = super::local_dir(&dir).ok()?;
    let complete = !files.weights.is_empty() && files.weights.iter().all(|w| w.is_file());
    complete.then_some(dir)
}

fn api() -> Result<Api> {
    let mut builder = ApiBuilder::from_cache(cache()).with_progress(false);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if let Ok(token) = std::env::var("HF_TOKEN")
        && !token.is_empty()
    {
        builder = builder.with_token(Some(token));
    }
    builder.build().context("setting up the hub client")
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string())
}

/// Turns hf-hub's errors into sentences that say what to do.
fn explain(model: &HubModel, e: ApiError) -> anyhow::Error {
    if let ApiError::RequestError(inner) = &e {
        match inner.as_ref() {
            ureq::Error::StatusCode(404) => {
                return anyhow::anyhow!(
                    "model {} not found on the hub (revision {})",
                    model.repo,
                    model.revision
                );
            }
            ureq::Error::StatusCode(401 | 403) => {
                return anyhow::anyhow!(
                    "model {} is gated, private or missing: if you have access, set HF_TOKEN to a token that grants it",
                    model.repo
                );
            }
            ureq::Error::StatusCode(code) => {
                return anyhow::anyhow!("the hub answered HTTP {code} for {}", model.repo);
            }
            _ => {
                return anyhow::anyhow!(
                    "cannot reach the hub at {} ({e}); a model already in the cache runs offline (--offline or HF_HUB_OFFLINE=1)",
                    endpoint()
                );
            }
        }
    }
    anyhow::anyhow!("downloading {}: {e}", model.repo)
}

fn download(model: &HubModel) -> Result<PathBuf> {
    let api = api()?;
    let repo = api.repo(repo_handle(model));
    let info = repo.info().map_err(|e| explain(model, e))?;
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let has = |name: &str| listed.contains(&name);
    if !has("config.json") {
        bail!(
            "{} has no config.json: not a transformers model repo",
            model.repo
        );
    }
    if !has("tokenizer.json") && !has("tokenizer.model") {
        bail!(
            "{} has no tokenizer (neither tokenizer.json nor tokenizer.model)",
            model.repo
        );
    }
    let fetch = |name: &str| -> Result<PathBuf> {
        let progress = Bar::new();
        match progress {
            Some(bar) => repo.download_with_progress(name, bar),
            None => repo.download_with_progress(name, ()),
        }
        .map_err(|e| explain(model, e))
        .with_context(|| format!("downloading {name} from {}", model.repo))
    };
    let get = |name: &str| cached(model, name).map(Ok).unwrap_or_else(|| fetch(name));
    let mut config = None;
    for name in SIDE_FILES.iter().filter(|n| has(n)) {
        let path = get(name)?;
        if *name == "config.json" {
            config = Some(path);
        }
    }
    // Safetensors when the repo has them, else PyTorch .bin files.
    let sharded = |index_name: &str| -> Result<()> {
        for shard in crate::weights::shards_from_index(&get(index_name)?)? {
            let name = shard
                .file_name()
                .and_then(|n| n.to_str())
                .context("a shard name is not UTF-8")?;
            get(name)?;
        }
        Ok(())
    };
    match super::WEIGHT_LAYOUTS.iter().find(|(name, _)| has(name)) {
        Some(&(index, true)) => sharded(index)?,
        Some(&(single, false)) => {
            get(single)?;
        }
        None => bail!(
            "{} has no usable weights (no safetensors or PyTorch .bin files)",
            model.repo
        ),
    }
    let dir = config
        .and_then(|c| c.parent().map(Path::to_path_buf))
        .context("config.json was not downloaded")?;
    Ok(dir)
}

fn cached(model: &HubModel, name: &str) -> Option<PathBuf> {
    cache()
        .repo(repo_handle(model))
        .get(name)
        .filter(|p| p.is_file())
}

/// A per-file progress bar (bytes, speed, ETA), only when stderr is a terminal.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Option<Self> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:30!} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(Self(bar))
    }
}

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_string());
    }
    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }
    fn finish(&mut self) {
        self.0.finish();
    }
}
