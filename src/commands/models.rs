//! `starling pull`, `list` and `rm`: the model cache, shared with Python's
//! huggingface_hub.

use crate::cli::{PullArgs, RmArgs};
use crate::source::hub::{self, HubModel, HubOptions};
use crate::source::{ModelSpec, known};
use anyhow::{Result, bail};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

fn hub_model(spec: &str) -> Result<HubModel> {
    match ModelSpec::parse(spec)? {
        ModelSpec::Hub(m) => Ok(m),
        ModelSpec::Local(dir) => bail!("{} is a local directory, not a hub model", dir.display()),
    }
}

pub fn pull(args: &PullArgs) -> Result<()> {
    let model = hub_model(&args.model)?;
    let options = HubOptions::from_env(false);
    // A reward model whose card names another repo's tokenizer: both.
    let borrowed = known::by_repo(&model.repo).and_then(|k| k.tokenizer);
    let parts = match borrowed {
        Some(_) => hub::Parts::NoTokenizer,
        None => hub::Parts::All,
    };
    let dir = hub::resolve(&model, options.with_parts(parts))?;
    println!("{} ready in {}", model.repo, dir.display());
    if let Some(repo) = borrowed {
        let tokenizer = hub_model(repo)?;
        let dir = hub::resolve(&tokenizer, options.with_parts(hub::Parts::TokenizerOnly))?;
        println!("{repo} (its tokenizer) ready in {}", dir.display());
    }
    Ok(())
}

pub fn list() -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "known names:")?;
    for k in known::KNOWN {
        writeln!(out, "  {:22} {:38} {}", k.name, k.repo, k.about)?;
    }
    let root = hub::cache().path().clone();
    writeln!(out, "cached in {}:", root.display())?;
    let mut rows = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(repo) = name.strip_prefix("models--") {
                rows.push((
                    repo.replacen("--", "/", 1),
                    dir_size(&entry.path().join("blobs")),
                ));
            }
        }
    }
    rows.sort();
    if rows.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for (repo, bytes) in rows {
        writeln!(out, "  {repo:60} {}", human(bytes))?;
    }
    Ok(())
}

pub fn rm(args: &RmArgs) -> Result<()> {
    let model = hub_model(&args.model)?;
    let dir = hub::repo_dir(&model.repo);
    if !dir.is_dir() {
        bail!(
            "{} is not in the cache ({})",
            model.repo,
            hub::cache().path().display()
        );
    }
    let size = human(dir_size(&dir.join("blobs")));
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "not removing {} ({size}) without confirmation: pass --yes",
                model.repo
            );
        }
        eprint!(
            "remove {} ({size}) from {}? [y/N] ",
            model.repo,
            dir.display()
        );
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("kept");
            return Ok(());
        }
    }
    std::fs::remove_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("removing {}: {e}", dir.display()))?;
    println!("removed {} ({size})", model.repo);
    Ok(())
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn human(bytes: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}
