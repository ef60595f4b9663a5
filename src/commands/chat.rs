//! `starling chat`: the REPL (rustyline: editing, history, completion of
//! slash commands) on a terminal, or one user turn per stdin line otherwise.
//! All conversation logic lives in `engine::Chat`; this file is input,
//! slash commands and printing.

use super::input;
use crate::cli::ChatArgs;
use crate::engine::{Chat, ChatSettings, TurnReport};
use crate::template::Template;
use anyhow::{Context, Result, bail};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const COMMANDS: [&str; 14] = [
    "/help", "/clear", "/system", "/mode", "/set", "/show", "/save", "/load", "/retry", "/undo",
    "/stats", "/exit", "/quit", "/bye",
];

const HELP: &str = "\
/help               this list
/clear              start a new conversation (keeps settings and system)
/system TEXT        set the system message (empty: none)
/mode chat|code     OpenChat's GPT4 Correct or Code mode
/set KEY VALUE      temperature, top_k, top_p, min_p, repeat_penalty, max_tokens, seed
/show               model, template, settings, context used
/save FILE          write the conversation as JSON
/load FILE          replace the conversation with a saved one
/retry              answer the last message again
/undo               drop the last exchange
/stats              the last answer's figures
/exit               quit (also Ctrl-D)
A line ending in \\ continues on the next line; \"\"\" opens and closes a block.";

pub fn run(args: &ChatArgs) -> Result<()> {
    let start_conversation = match &args.load {
        Some(path) => Some(input::read_messages(path)?),
        None => None,
    };
    let started = super::start_engine(&args.model, &args.device, &args.engine, 1)?;
    let settings = ChatSettings {
        sampling: args.sampling.resolve(&started.generation)?,
        max_tokens: args.sampling.max_tokens,
        stop_texts: args.answer.stop.clone(),
    };
    if args.answer.verbose {
        eprintln!("{}", started.engine.describe());
    }
    let model = started.origin.display().to_string();
    let mut chat = Chat::new(
        started.engine,
        started.tokenizer,
        started.template,
        started.stop_ids,
        settings,
    );
    chat.set_system(args.answer.system.clone());
    if let Some(messages) = start_conversation {
        chat.load(messages)?;
        if args.answer.system.is_some() {
            chat.set_system(args.answer.system.clone());
        }
    }

    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    // Ctrl-C while answering stops the answer; at the prompt rustyline reads it as a key.
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;

    let mut repl = Repl {
        chat,
        interrupt,
        verbose: args.answer.verbose,
        model,
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        failed: false,
        output_closed: false,
    };
    if std::io::stdin().is_terminal() {
        repl.interactive()
    } else {
        repl.batch()
    }
}

struct Repl {
    chat: Chat,
    interrupt: Arc<AtomicBool>,
    verbose: bool,
    model: String,
    color: bool,
    failed: bool,
    /// Standard output was closed by its reader.
    output_closed: bool,
}

enum Next {
    Continue,
    Exit,
}

impl Repl {
    /// Non-terminal use: one user turn per line (slash commands allowed);
    /// stdout gets only the answers, one per turn.
    fn batch(&mut self) -> Result<()> {
        let stdin = std::io::stdin();
        let mut stdin = stdin.lock();
        let mut lines = Assembler::default();
        let mut bytes = Vec::new();
        for n in 1.. {
            bytes.clear();
            let what = format!("line {n} of standard input");
            if super::input::read_line_bounded(&mut stdin, &mut bytes, &what)? == 0 {
                break;
            }
            if bytes.last() == Some(&b'\n') {
                bytes.pop();
            }
            let line = std::str::from_utf8(&bytes)
                .map_err(|_| anyhow::anyhow!("{what} is not valid UTF-8"))?
                .to_string();
            if let Some(input) = lines.push(line.trim_end_matches('\r'))
                && let Next::Exit = self.handle(input)
            {
                return self.batch_result();
            }
        }
        // Input ended inside a """ block or after a trailing \: what was
        // typed is still the user's last turn, not something to drop.
        if let Some(input) = lines.finish() {
            self.handle(input);
        }
        self.batch_result()
    }

    fn batch_result(&self) -> Result<()> {
        if self.failed {
            bail!("some turns failed (see above)");
        }
        Ok(())
    }

    fn interactive(&mut self) -> Result<()> {
        use rustyline::error::ReadlineError;
        let mut editor: rustyline::Editor<SlashHelper, rustyline::history::DefaultHistory> =
            rustyline::Editor::new().context("starting the line editor")?;
        editor.set_helper(Some(SlashHelper));
        let history = history_path();
        if let Some(path) = &history {
            let _ = editor.load_history(path);
        }
        eprintln!(
            "starling chat: {} — /help for commands, Ctrl-D to quit",
            self.model
        );
        let mut lines = Assembler::default();
        loop {
            let prompt = if lines.is_open() { "... " } else { ">>> " };
            match editor.readline(prompt) {
                Ok(line) => {
                    if let Some(input) = lines.push(&line) {
                        let _ = editor.add_history_entry(input.text.as_str());
                        if let Next::Exit = self.handle(input) {
                            break;
                        }
                    }
                }
                // Ctrl-C at the prompt clears the line (and any open block).
                Err(ReadlineError::Interrupted) => lines = Assembler::default(),
                Err(ReadlineError::Eof) => {
                    // Ctrl-D inside an open block sends it rather than losing it.
                    if let Some(input) = lines.finish() {
                        let _ = editor.add_history_entry(input.text.as_str());
                        self.handle(input);
                    }
                    break;
                }
                Err(e) => return Err(e).context("reading input"),
            }
        }
        if let Some(path) = &history {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = editor.save_history(path) {
                eprintln!("warning: could not save history to {}: {e}", path.display());
            }
        }
        Ok(())
    }

    /// One complete input: a slash command or a user message. Only a single
    /// typed line can be a command: a """ block or a continued line is
    /// always a message, whatever its first line says.
    fn handle(&mut self, input: Input) -> Next {
        let trimmed = input.text.trim();
        if trimmed.is_empty() {
            return Next::Continue;
        }
        if !input.multi_line && trimmed.starts_with('/') && !trimmed.starts_with("//") {
            return match self.command(trimmed) {
                Ok(next) => next,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    Next::Continue
                }
            };
        }
        let input = input.text.as_str();
        self.answer(|chat, out, interrupt| chat.say(input, out, interrupt));
        if self.output_closed {
            return Next::Exit;
        }
        Next::Continue
    }

    fn answer(
        &mut self,
        turn: impl FnOnce(
            &mut Chat,
            &mut dyn FnMut(&str) -> Result<()>,
            Option<&AtomicBool>,
        ) -> Result<TurnReport>,
    ) {
        self.interrupt.store(false, Ordering::SeqCst);
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let color = self.color;
        if color {
            let _ = out.write_all(b"\x1b[36m");
        }
        let result = turn(
            &mut self.chat,
            &mut |piece| {
                out.write_all(piece.as_bytes())?;
                out.flush()?;
                Ok(())
            },
            Some(&self.interrupt),
        );
        if color {
            let _ = out.write_all(b"\x1b[0m");
        }
        match result {
            Ok(report) => {
                let _ = writeln!(out);
                let _ = out.flush();
                if report.dropped > 0 {
                    eprintln!(
                        "(the conversation outgrew the context: {} oldest exchange{} left the window)",
                        report.dropped,
                        if report.dropped == 1 { "" } else { "s" }
                    );
                }
                if report.stop == crate::engine::StopReason::Interrupted {
                    eprintln!("(interrupted)");
                }
                if self.verbose {
                    eprintln!("{}", report.stats.logfmt());
                }
            }
            // The reader went away (`| head`): stop answering, quietly.
            Err(e) if super::is_broken_pipe(&e) => self.output_closed = true,
            Err(e) => {
                let _ = out.flush();
                eprintln!("error: {e:#}");
                self.failed = true;
            }
        }
    }

    fn command(&mut self, line: &str) -> Result<Next> {
        let (name, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        match name {
            "/help" | "/?" => eprintln!("{HELP}"),
            "/exit" | "/quit" | "/bye" => return Ok(Next::Exit),
            "/clear" => {
                self.chat.clear();
                eprintln!("(new conversation)");
            }
            "/system" => {
                self.chat.set_system(Some(rest.to_string()));
                eprintln!(
                    "(system message {})",
                    if rest.is_empty() { "cleared" } else { "set" }
                );
            }
            "/mode" => {
                let template = match rest {
                    "chat" => Template::OpenChat,
                    "code" => Template::OpenChatCode,
                    _ => bail!("/mode chat or /mode code"),
                };
                self.chat.set_template(template);
                eprintln!("(mode {rest})");
            }
            "/set" => {
                let (key, value) = rest
                    .split_once(char::is_whitespace)
                    .context("/set KEY VALUE")?;
                self.set(key, value.trim())?;
                eprintln!("({key} = {})", value.trim());
            }
            "/show" => self.show(),
            "/save" => {
                let path = path_arg(rest, "/save FILE")?;
                save_atomically(&path, &self.chat.transcript())?;
                eprintln!(
                    "(saved {} messages to {})",
                    self.chat.transcript().len(),
                    path.display()
                );
            }
            "/load" => {
                let path = path_arg(rest, "/load FILE")?;
                let messages = input::read_messages(&path)?;
                let n = messages.len();
                self.chat.load(messages)?;
                eprintln!("(loaded {n} messages from {})", path.display());
            }
            "/retry" => self.answer(|chat, out, interrupt| chat.retry(out, interrupt)),
            "/undo" => {
                self.chat.undo()?;
                eprintln!("(dropped the last exchange)");
            }
            "/stats" => match self.chat.last_stats() {
                Some(stats) => eprintln!("{}", stats.logfmt()),
                None => eprintln!("(no answer yet)"),
            },
            other => bail!("unknown command {other}; /help lists them"),
        }
        Ok(Next::Continue)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let mut sampling = self.chat.settings.sampling.clone();
        let bad = || format!("{key}: {value:?} is not a valid value");
        match key {
            "temperature" => sampling.temperature = value.parse().with_context(bad)?,
            "top_k" => sampling.top_k = value.parse().with_context(bad)?,
            "top_p" => sampling.top_p = value.parse().with_context(bad)?,
            "min_p" => sampling.min_p = value.parse().with_context(bad)?,
            "repeat_penalty" => sampling.repeat_penalty = value.parse().with_context(bad)?,
            "max_tokens" => {
                self.chat.settings.max_tokens = value.parse().with_context(bad)?;
                return Ok(());
            }
            "seed" => {
                self.chat.set_seed(value.parse().with_context(bad)?);
                return Ok(());
            }
            _ => bail!(
                "unknown setting {key} (temperature, top_k, top_p, min_p, repeat_penalty, max_tokens, seed)"
            ),
        }
        sampling.validate()?;
        self.chat.settings.sampling = sampling;
        Ok(())
    }

    fn show(&self) {
        let s = &self.chat.settings;
        let (used, max) = self.chat.context();
        eprintln!(
            "model: {}\ntemplate: {}\ntemperature={} top_k={} top_p={} min_p={} repeat_penalty={} max_tokens={} seed={}\ncontext: {used} of {max} tokens",
            self.model,
            self.chat.template().name(),
            s.sampling.temperature,
            s.sampling.top_k,
            s.sampling.top_p,
            s.sampling.min_p,
            s.sampling.repeat_penalty,
            s.max_tokens,
            s.sampling.seed
        );
    }
}

fn path_arg(rest: &str, usage: &str) -> Result<PathBuf> {
    if rest.is_empty() {
        bail!("usage: {usage}");
    }
    Ok(PathBuf::from(rest))
}

/// Writes to a temporary file beside `path`, then renames it over `path`,
/// so a failed save never leaves half a conversation behind.
fn save_atomically(path: &Path, messages: &[crate::template::Message]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("the path names no file")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let json = serde_json::to_string_pretty(messages)?;
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("saving to {}: {e}", path.display())
    })
}

/// `$XDG_DATA_HOME/starling/history` (e.g. ~/.local/share/starling/history).
fn history_path() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("starling").join("history"))
}

/// Joins physical lines into one input: a trailing `\` continues the line,
/// and `"""` opens and closes a verbatim block.
#[derive(Default)]
struct Assembler {
    buffer: String,
    in_block: bool,
    continued: bool,
}

/// A complete input: what the user wrote, and whether it spans lines (a
/// """ block or a line continued with a backslash).
#[derive(Debug, PartialEq, Eq)]
struct Input {
    text: String,
    multi_line: bool,
}

impl Input {
    fn line(text: impl Into<String>) -> Self {
        Input {
            text: text.into(),
            multi_line: false,
        }
    }

    fn multi_line(text: impl Into<String>) -> Self {
        Input {
            text: text.into(),
            multi_line: true,
        }
    }
}

impl Assembler {
    fn is_open(&self) -> bool {
        self.in_block || self.continued
    }

    /// What an open block or continuation holds when input ends, as the
    /// message it would have become.
    fn finish(&mut self) -> Option<Input> {
        let open = self.is_open();
        self.in_block = false;
        self.continued = false;
        let text = take_without_last_newline(&mut self.buffer);
        (open && !text.trim().is_empty()).then(|| Input::multi_line(text))
    }

    fn push(&mut self, line: &str) -> Option<Input> {
        if self.in_block {
            if let Some(before) = line.strip_suffix("\"\"\"") {
                self.buffer.push_str(before);
                self.in_block = false;
                // A closing """ on its own line ends the text at the line before.
                return Some(Input::multi_line(take_without_last_newline(
                    &mut self.buffer,
                )));
            }
            self.buffer.push_str(line);
            self.buffer.push('\n');
            return None;
        }
        if !self.continued && line.trim_start().starts_with("\"\"\"") {
            let after = &line.trim_start()[3..];
            if let Some(inner) = after.strip_suffix("\"\"\"") {
                return Some(Input::multi_line(inner));
            }
            self.in_block = true;
            if !after.is_empty() {
                self.buffer.push_str(after);
                self.buffer.push('\n');
            }
            return None;
        }
        if let Some(before) = line.strip_suffix('\\') {
            self.buffer.push_str(before);
            self.buffer.push('\n');
            self.continued = true;
            return None;
        }
        let multi = self.continued;
        self.continued = false;
        self.buffer.push_str(line);
        let text = std::mem::take(&mut self.buffer);
        Some(if multi {
            Input::multi_line(text)
        } else {
            Input::line(text)
        })
    }
}

fn take_without_last_newline(buffer: &mut String) -> String {
    let mut text = std::mem::take(buffer);
    if text.ends_with('\n') {
        text.pop();
    }
    text
}

/// Tab completion of slash commands.
#[derive(rustyline::Helper, rustyline::Hinter, rustyline::Highlighter, rustyline::Validator)]
struct SlashHelper;

impl rustyline::completion::Completer for SlashHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let word = &line[..pos];
        if !word.starts_with('/') || word.contains(char::is_whitespace) {
            return Ok((pos, Vec::new()));
        }
        Ok((
            0,
            COMMANDS
                .iter()
                .filter(|c| c.starts_with(word))
                .map(|c| c.to_string())
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_continued_lines_and_blocks() {
        let mut a = Assembler::default();
        assert_eq!(a.push("one \\"), None);
        assert_eq!(a.push("two"), Some(Input::multi_line("one \ntwo")));
        assert_eq!(a.push("\"\"\"first"), None);
        assert_eq!(a.push("  second"), None);
        assert_eq!(
            a.push("third\"\"\""),
            Some(Input::multi_line("first\n  second\nthird"))
        );
        assert_eq!(
            a.push("\"\"\"inline\"\"\""),
            Some(Input::multi_line("inline"))
        );
        assert_eq!(a.push("plain"), Some(Input::line("plain")));
        // A closing """ on its own line adds no newline: the same text as
        // a block cut off by the end of input.
        assert_eq!(a.push("\"\"\""), None);
        assert_eq!(a.push("A"), None);
        assert_eq!(a.push("\"\"\""), Some(Input::multi_line("A")));
    }

    #[test]
    fn input_that_ends_inside_a_block_or_continuation_is_kept() {
        let mut a = Assembler::default();
        assert_eq!(a.push("\"\"\""), None);
        assert_eq!(a.push("line one"), None);
        assert_eq!(a.push("line two"), None);
        assert_eq!(a.finish(), Some(Input::multi_line("line one\nline two")));
        assert!(!a.is_open());
        assert_eq!(a.push("last \\"), None);
        assert_eq!(a.finish(), Some(Input::multi_line("last ")));
        assert_eq!(a.push("closed"), Some(Input::line("closed")));
        assert_eq!(a.finish(), None, "nothing pending after a complete line");
    }

    #[test]
    fn saves_atomically_and_refuses_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conv.json");
        let msgs = vec![crate::template::Message::new("user", "hi")];
        save_atomically(&path, &msgs).unwrap();
        let back: Vec<crate::template::Message> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, msgs);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
        assert!(save_atomically(&dir.path().join("missing/conv.json"), &msgs).is_err());
    }
}
