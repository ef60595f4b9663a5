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
    /// For repos of GGUF files: which one to run.
    pub gguf: Option<GgufChoice>,
}

/// One GGUF file of a repo, by name (`--gguf-file`) or by quantization tag
/// (`owner/name:Q4_K_M`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GgufChoice {
    File(String),
    Tag(String),
}

impl GgufChoice {
    /// The one file of `names` this choice means, or a sentence listing them.
    pub fn pick<'a>(&self, repo: &str, names: &[&'a str]) -> Result<&'a str> {
        let mut ggufs: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
            .collect();
        ggufs.sort_unstable();
        let listing = if ggufs.is_empty() {
            "it has no GGUF files".to_string()
        } else {
            format!("its GGUF files: {}", ggufs.join(", "))
        };
        let found: Vec<&str> = match self {
            Self::File(f) => ggufs.iter().copied().filter(|n| n == f).collect(),
            Self::Tag(t) => ggufs.iter().copied().filter(|n| has_tag(n, t)).collect(),
        };
        match (found.as_slice(), self) {
            ([one], _) => Ok(one),
            ([], Self::File(f)) => bail!("{repo} has no file {f}; {listing}"),
            ([], Self::Tag(t)) => bail!("{repo} has no GGUF file tagged {t}; {listing}"),
            (many, _) => bail!(
                "several GGUF files of {repo} match: {}; choose one with --gguf-file",
                many.join(", ")
            ),
        }
    }
}

/// Whether file name `name` carries quantization tag `tag` as a whole word:
/// `Q4_K` matches `model.Q4_K.gguf` but not `model-Q4_K_M.gguf`.
fn has_tag(name: &str, tag: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let tag = tag.to_ascii_lowercase();
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    name.match_indices(&tag).any(|(i, _)| {
        !word(name[..i].chars().next_back()) && !word(name[i + tag.len()..].chars().next())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_match_whole_words_only() {
        assert!(has_tag("starling-lm-7b-beta.Q4_K_M.gguf", "q4_k_m"));
        assert!(has_tag("model-Q8_0.gguf", "Q8_0"));
        assert!(!has_tag("model-Q4_K_M.gguf", "Q4_K"));
        assert!(!has_tag("model-IQ4_K.gguf", "Q4_K"));
    }

    #[test]
    fn a_choice_names_exactly_one_file_or_lists_them() {
        let names = [
            "config.json",
            "m.Q4_K_M.gguf",
            "m.Q4_K_S.gguf",
            "m.Q8_0.gguf",
        ];
        let tag = |t: &str| GgufChoice::Tag(t.into()).pick("o/m", &names);
        assert_eq!(tag("Q8_0").unwrap(), "m.Q8_0.gguf");
        let err = tag("Q5_K_M").unwrap_err().to_string();
        assert!(
            err.contains("its GGUF files: m.Q4_K_M.gguf, m.Q4_K_S.gguf, m.Q8_0.gguf"),
            "{err}"
        );
        let file = GgufChoice::File("m.Q4_K_S.gguf".into());
        assert_eq!(file.pick("o/m", &names).unwrap(), "m.Q4_K_S.gguf");
        let err = GgufChoice::Tag("gguf".into())
            .pick("o/m", &names)
            .unwrap_err();
        assert!(err.to_string().contains("several GGUF files"), "{err}");
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct HubOptions {
    /// Use only the cache (`--offline` or `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    pub parts: Parts,
}

/// Which files of a transformers repo a run needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Parts {
    /// Config, tokenizer and weights.
    #[default]
    All,
    /// Config and weights: a reward model whose card names another repo's tokenizer.
    NoTokenizer,
    /// The tokenizer files alone (that other repo: no weights downloaded).
    TokenizerOnly,
}

impl HubOptions {
    pub fn from_env(offline_flag: bool) -> Self {
        let env = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"));
        Self {
            offline: offline_flag || env,
            parts: Parts::All,
        }
    }

    pub fn with_parts(self, parts: Parts) -> Self {
        Self { parts, ..self }
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

/// The snapshot directory holding a complete model (or, for a GGUF choice,
/// the GGUF file), downloading what is missing.
pub fn resolve(model: &HubModel, options: HubOptions) -> Result<PathBuf> {
    let cached = match &model.gguf {
        Some(choice) => cached_gguf(model, choice),
        None => cached_snapshot(model, options.parts),
    };
    if let Some(dir) = cached {
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
    let model = model.clone();
    guard_stalls(move |activity| match &model.gguf {
        Some(choice) => download_gguf(&model, choice, activity),
        None => download(&model, options.parts, activity),
    })
}

/// How long a download may receive nothing before it is abandoned
/// (`STARLING_HUB_STALL_S` overrides; 60 s by default).
fn stall_limit() -> std::time::Duration {
    let seconds = std::env::var("STARLING_HUB_STALL_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e6)
        .unwrap_or(60.0);
    std::time::Duration::from_secs_f64(seconds)
}

/// When the transfers last made progress: a request answered, bytes received.
#[derive(Clone)]
struct Activity(std::sync::Arc<std::sync::Mutex<std::time::Instant>>);

impl Activity {
    fn tick(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    fn idle(&self) -> std::time::Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

/// Runs `work` (the transfers) on its own thread and gives up when it
/// makes no progress for `stall_limit()`.
///
/// hf-hub 0.5's blocking client builds its ureq agent inside and sets no
/// timeouts, so a hub that accepts a connection and then sends nothing
/// would hang the command forever. The stalled thread is left blocked on
/// its socket (nothing can interrupt it); the command ends with the error,
/// and hf-hub's `.part` file lets the next try resume.
fn guard_stalls<T: Send + 'static>(
    work: impl FnOnce(&Activity) -> Result<T> + Send + 'static,
) -> Result<T> {
    let activity = Activity(std::sync::Arc::new(std::sync::Mutex::new(
        std::time::Instant::now(),
    )));
    let (tx, rx) = std::sync::mpsc::channel();
    let watched = activity.clone();
    std::thread::Builder::new()
        .name("hub-download".into())
        .spawn(move || {
            let _ = tx.send(work(&watched));
        })
        .context("starting the download thread")?;
    let limit = stall_limit();
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(result) => return result,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the download thread ended without an answer")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if activity.idle() > limit => bail!(
                "the hub at {} sent nothing for {:.0} s: the download stalled (try again; set STARLING_HUB_STALL_S to wait longer)",
                endpoint(),
                limit.as_secs_f64()
            ),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// The chosen GGUF file in the cached snapshot of `model`'s revision.
fn cached_gguf(model: &HubModel, choice: &GgufChoice) -> Option<PathBuf> {
    let dir = repo_dir(&model.repo);
    let commit = std::fs::read_to_string(dir.join("refs").join(&model.revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| model.revision.clone());
    let snapshot = dir.join("snapshots").join(commit);
    let names: Vec<String> = std::fs::read_dir(&snapshot)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let name = choice.pick(&model.repo, &names).ok()?;
    Some(snapshot.join(name)).filter(|p| p.is_file())
}

/// Downloads one GGUF file: everything a run needs is inside it.
fn download_gguf(model: &HubModel, choice: &GgufChoice, activity: &Activity) -> Result<PathBuf> {
    let api = api()?;
    let repo = api.repo(repo_handle(model));
    let info = repo.info().map_err(|e| explain(model, e))?;
    activity.tick();
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let name = choice.pick(&model.repo, &listed)?;
    repo.download_with_progress(name, Watch::new(activity))
        .map_err(|e| explain(model, e))
        .with_context(|| format!("downloading {name} from {}", model.repo))
}

/// A cached snapshot of `model` that has everything a run needs, if any.
fn cached_snapshot(model: &HubModel, parts: Parts) -> Option<PathBuf> {
    let repo = cache().repo(repo_handle(model));
    if parts == Parts::TokenizerOnly {
        let file = repo
            .get("tokenizer.json")
            .or_else(|| repo.get("tokenizer.model"))?;
        return Some(file.parent()?.to_path_buf());
    }
    let config = repo.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    let files = super::local_dir_with(&dir, parts).ok()?;
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

fn download(model: &HubModel, parts: Parts, activity: &Activity) -> Result<PathBuf> {
    let api = api()?;
    let repo = api.repo(repo_handle(model));
    let info = repo.info().map_err(|e| explain(model, e))?;
    activity.tick();
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let has = |name: &str| listed.contains(&name);
    if parts != Parts::TokenizerOnly && !has("config.json") {
        let ggufs = listed
            .iter()
            .any(|n| n.to_ascii_lowercase().ends_with(".gguf"));
        let hint = if ggufs {
            " (it holds GGUF files: choose one as owner/name:Q4_K_M or with --gguf-file)"
        } else {
            ""
        };
        bail!(
            "{} has no config.json: not a transformers model repo{hint}",
            model.repo
        );
    }
    if parts != Parts::NoTokenizer && !has("tokenizer.json") && !has("tokenizer.model") {
        bail!(
            "{} has no tokenizer (neither tokenizer.json nor tokenizer.model)",
            model.repo
        );
    }
    let fetch = |name: &str| -> Result<PathBuf> {
        repo.download_with_progress(name, Watch::new(activity))
            .map_err(|e| explain(model, e))
            .with_context(|| format!("downloading {name} from {}", model.repo))
    };
    let get = |name: &str| cached(model, name).map(Ok).unwrap_or_else(|| fetch(name));
    let mut config = None;
    for name in SIDE_FILES.iter().filter(|n| has(n)) {
        let path = get(name)?;
        if *name == "config.json" || parts == Parts::TokenizerOnly {
            config = Some(path);
        }
    }
    if parts == Parts::TokenizerOnly {
        return config
            .and_then(|c| c.parent().map(Path::to_path_buf))
            .context("no tokenizer file was downloaded");
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

/// One file's progress: the activity the stall guard watches, and the bar.
struct Watch {
    activity: Activity,
    bar: Option<Bar>,
}

impl Watch {
    fn new(activity: &Activity) -> Self {
        Self {
            activity: activity.clone(),
            bar: Bar::new(),
        }
    }
}

impl hf_hub::api::Progress for Watch {
    fn init(&mut self, size: usize, filename: &str) {
        self.activity.tick();
        if let Some(Bar(bar)) = &self.bar {
            bar.set_length(size as u64);
            bar.set_position(0);
            bar.set_message(filename.to_string());
        }
    }
    fn update(&mut self, size: usize) {
        self.activity.tick();
        if let Some(Bar(bar)) = &self.bar {
            bar.inc(size as u64);
        }
    }
    fn finish(&mut self) {
        self.activity.tick();
        if let Some(Bar(bar)) = &self.bar {
            bar.finish();
        }
    }
}
