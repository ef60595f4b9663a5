//! What the user gave: stdin and conversation files, checked before any
//! model is loaded so bad input fails fast.

use crate::template::Message;
use anyhow::{Context, Result, bail};
use std::io::{IsTerminal, Read};
use std::path::Path;

/// All of stdin as UTF-8, or `None` when stdin is a terminal (nothing piped).
pub fn piped_stdin() -> Result<Option<String>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    stdin
        .lock()
        .read_to_end(&mut bytes)
        .context("reading standard input")?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Some(text)),
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
            bail!("standard input is not valid UTF-8 (line {line}, invalid byte at offset {at})")
        }
    }
}

/// A conversation file: a JSON array of {"role", "content"}.
pub fn read_messages(path: &Path) -> Result<Vec<Message>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{} is not valid UTF-8", path.display()))?;
    let messages: Vec<Message> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON array of {{\"role\", \"content\"}}",
            path.display()
        )
    })?;
    if messages.is_empty() {
        bail!("{} holds no messages", path.display());
    }
    Ok(messages)
}

/// Puts `system` first, replacing a system message the conversation has.
pub fn with_system(mut messages: Vec<Message>, system: Option<&str>) -> Vec<Message> {
    if let Some(system) = system {
        messages.retain(|m| m.role != "system");
        messages.insert(0, Message::new("system", system));
    }
    messages
}
