//! What the user gave: stdin and conversation files, checked before any
//! model is loaded so bad input fails fast.

use crate::template::Message;
use anyhow::{Context, Result, bail};
use std::io::{BufRead, IsTerminal, Read};
use std::path::Path;

/// The most bytes one input may have: a prompt, a conversation file, stdin,
/// one `--each-line` line. Far beyond any context (128k tokens are about
/// 0.5 MB of text), and a bound on what tokenizing can cost.
pub const MAX_INPUT_BYTES: u64 = 8 << 20;

/// An input over [`MAX_INPUT_BYTES`], told apart from a failed read (the
/// line readers go on after the one, not after the other).
#[derive(Debug)]
struct TooLong(String);

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is longer than {} MiB, more than any model's context holds",
            self.0,
            MAX_INPUT_BYTES >> 20
        )
    }
}

impl std::error::Error for TooLong {}

fn too_long(what: &str) -> anyhow::Error {
    TooLong(what.to_string()).into()
}

fn is_too_long(e: &anyhow::Error) -> bool {
    e.downcast_ref::<TooLong>().is_some()
}

/// Reads one line (up to and including `\n`) into `buf`, at most
/// [`MAX_INPUT_BYTES`]; returns the bytes read (0 at the end).
pub fn read_line_bounded(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<usize> {
    // The limit is on the line's text; its newline comes on top.
    let n = reader
        .take(MAX_INPUT_BYTES + 1)
        .read_until(b'\n', buf)
        .with_context(|| format!("reading {what}"))?;
    if n as u64 > MAX_INPUT_BYTES && buf.last() != Some(&b'\n') {
        return Err(too_long(what));
    }
    Ok(n)
}

/// Discards the rest of a line that was too long (up to and including its
/// newline), reading a buffer at a time; returns whether input remains.
pub fn skip_line(reader: &mut impl BufRead) -> Result<bool> {
    loop {
        let buf = reader.fill_buf().context("reading standard input")?;
        if buf.is_empty() {
            return Ok(false);
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(true);
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

/// `--each-line` (`run`, `score`): a thread hands over each non-blank stdin
/// line as `parse` makes it, with its line number, as soon as it is
/// complete, at most `ahead` lines ahead of the reader of the channel. A
/// line that is not UTF-8 or over [`MAX_INPUT_BYTES`] comes as its error
/// and reading goes on after it; a read that fails comes as its error and
/// ends the lines.
pub fn spawn_line_reader<T: Send + 'static>(
    ahead: usize,
    parse: impl Fn(&str) -> Result<T> + Send + 'static,
) -> std::sync::mpsc::Receiver<(usize, Result<T>)> {
    let (tx, rx) = std::sync::mpsc::sync_channel(ahead);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut bytes = Vec::new();
        for n in 1.. {
            bytes.clear();
            let mut last = false;
            let item = match read_line_bounded(&mut stdin, &mut bytes, "the line") {
                Ok(0) => return,
                Ok(_) => match std::str::from_utf8(&bytes) {
                    Ok(line) if line.trim().is_empty() => continue,
                    Ok(line) => parse(line.trim_end_matches(['\n', '\r'])),
                    Err(e) => Err(anyhow::anyhow!(
                        "not valid UTF-8 (invalid byte at column {})",
                        e.valid_up_to() + 1
                    )),
                },
                // Too long: that line is answered with the error, and
                // reading goes on after it.
                Err(e) if is_too_long(&e) => match skip_line(&mut stdin) {
                    Ok(_) => Err(e),
                    Err(read) => {
                        last = true;
                        Err(read)
                    }
                },
                Err(read) => {
                    last = true;
                    Err(read)
                }
            };
            if tx.send((n, item)).is_err() || last {
                return;
            }
        }
    });
    rx
}

/// All of stdin as UTF-8, or `None` when stdin is a terminal (nothing piped).
pub fn piped_stdin() -> Result<Option<String>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    stdin
        .lock()
        .take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut bytes)
        .context("reading standard input")?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(too_long("standard input"));
    }
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
    let bytes = read_file(path)?;
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

/// A whole file, at most [`MAX_INPUT_BYTES`].
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(too_long(&path.display().to_string()));
    }
    Ok(bytes)
}

/// Puts `system` first, replacing a system message the conversation has.
pub fn with_system(mut messages: Vec<Message>, system: Option<&str>) -> Vec<Message> {
    if let Some(system) = system {
        messages.retain(|m| m.role != "system");
        // An empty one means none, as chat's `/system` with no text.
        if !system.trim().is_empty() {
            messages.insert(0, Message::new("system", system));
        }
    }
    messages
}
