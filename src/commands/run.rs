//! `starling run`: answer a prompt (argument, stdin, both, each stdin line,
//! or a whole conversation), streaming text or printing JSON.

use super::input;
use crate::cli::RunArgs;
use crate::engine::{Event, GenerateRequest, Handle};
use crate::template::{Message, Template};
use anyhow::{Result, bail};
use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::mpsc::{self, TryRecvError};

pub fn run(args: &RunArgs) -> Result<()> {
    if let Some(n) = args.best_of.best_of {
        if args.each_line {
            bail!("--best-of answers one prompt; it does not combine with --each-line");
        }
        let conversation = conversation(args)?;
        return super::best_of::run(args, n, conversation);
    }
    // Bad input fails before the model loads: everything but `--each-line`'s
    // stdin, which is read as it comes (lines are answered as they arrive,
    // so `tail -f log | starling run --each-line` works).
    let prompts = if args.each_line {
        each_line_source(args)?
    } else {
        let (tx, rx) = mpsc::channel();
        let _ = tx.send((0, Ok(conversation(args)?)));
        rx
    };
    let started = super::start_engine(&args.model, &args.device, &args.engine, 4)?;
    let sampling = args.sampling.resolve(&started.generation)?;
    let (engine, tokenizer) = (&started.engine, &started.tokenizer);
    if args.answer.verbose {
        eprintln!("{}", engine.describe());
    }

    // Prompts are queued as they come (the engine answers --parallel of
    // them together); answers are printed in input order, the first one
    // streaming. With --each-line a line that cannot be answered (not
    // UTF-8, over the input limit, longer than the context) is answered
    // with its error in its place and reading goes on, as `score
    // --each-line` does; the run then fails, counting them. A single
    // prompt's refusal is the run's error.
    let mut pending: VecDeque<(Option<usize>, Result<Accepted>)> = VecDeque::new();
    let mut open = true;
    let (mut total, mut failed) = (0usize, 0usize);
    // Lines read ahead of the answers: enough to keep every slot busy,
    // bounded so a fast producer never fills the memory.
    let read_ahead = 8 * engine.parallel();
    // Whether the front answer's text has begun on stdout.
    let mut streamed = false;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    loop {
        while open && pending.len() < read_ahead {
            // Nothing to print: wait for the next prompt; else only look.
            let next = if pending.is_empty() {
                prompts.recv().ok()
            } else {
                match prompts.try_recv() {
                    Ok(next) => Some(next),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => None,
                }
            };
            let Some((n, messages)) = next else {
                open = false;
                break;
            };
            let line = args.each_line.then_some(n);
            total += 1;
            let submitted = messages.and_then(|messages| {
                let prompt = started.template.encode(tokenizer, &messages)?;
                let handle = engine.submit(GenerateRequest {
                    prompt,
                    // Each prompt starts from the seed, so an answer never depends on the others.
                    sampling: sampling.clone(),
                    max_tokens: args.sampling.max_tokens,
                    stop_ids: started.stop_ids.clone(),
                    stop_texts: args.answer.stop.clone(),
                    // A raw prompt is continued, not answered: keep the first space.
                    continuation: matches!(started.template, Template::Raw),
                    logprobs: None,
                })?;
                Ok((messages, handle))
            });
            match (line, submitted) {
                (None, Err(e)) => return Err(e),
                (line, submitted) => pending.push_back((line, submitted)),
            }
        }
        let Some((line, front)) = pending.front() else {
            if open {
                continue;
            }
            break;
        };
        let line = *line;
        let answered = match front {
            Err(_) => None,
            Ok((messages, handle)) => {
                // The first answer streams for a moment; then stdin is looked at again.
                match handle.recv_timeout(std::time::Duration::from_millis(20))? {
                    Some(Event::Text(piece)) => {
                        if !args.json {
                            out.write_all(piece.as_bytes())?;
                            out.flush()?;
                            streamed = true;
                        }
                        continue;
                    }
                    Some(Event::Token { .. }) | None => continue,
                    Some(Event::Failed(e)) if line.is_none() => return Err(e),
                    Some(Event::Failed(e)) => Some(Err(e)),
                    Some(Event::Finished(outcome)) => {
                        let prompt = messages.last().map(|m| m.content.clone());
                        Some(Ok((prompt.unwrap_or_default(), outcome)))
                    }
                }
            }
        };
        let (_, front) = pending.pop_front().expect("the front entry");
        let began = std::mem::take(&mut streamed);
        let answered = match (answered, front) {
            (Some(answer), _) => answer,
            (None, Err(e)) => Err(e),
            (None, Ok(_)) => unreachable!("an accepted prompt answers or fails"),
        };
        match answered {
            Ok((prompt, outcome)) => {
                if args.json {
                    let mut object = serde_json::json!({
                        "prompt": prompt,
                        "response": outcome.text,
                        "stop_reason": outcome.stop.as_str(),
                        "prompt_tokens": outcome.stats.prompt_tokens,
                        "gen_tokens": outcome.stats.gen_tokens,
                    });
                    if let Some(n) = line {
                        object["line"] = n.into();
                    }
                    writeln!(out, "{object}")?;
                } else {
                    writeln!(out)?;
                }
                if args.answer.verbose {
                    eprintln!("load_s={:.3} {}", started.load_s, outcome.stats.logfmt());
                }
            }
            Err(e) => {
                failed += 1;
                let n = line.expect("only --each-line's lines are answered with errors");
                let message = format!("line {n} of standard input: {}", super::error_line(&e));
                if args.json {
                    let object = serde_json::json!({ "line": n, "error": { "message": message } });
                    writeln!(out, "{object}")?;
                } else {
                    if began {
                        // Its text so far ends its line, as an answer's does.
                        writeln!(out)?;
                    }
                    eprintln!("error: {message}");
                }
            }
        }
        out.flush()?;
    }
    if total == 0 {
        bail!("--each-line: stdin holds no prompts");
    }
    if failed > 0 {
        bail!("{failed} of {total} lines could not be answered (see their errors)");
    }
    Ok(())
}

/// A prompt the engine took: its conversation and the answer's handle.
type Accepted = (Vec<Message>, Handle);

/// A prompt to answer: the stdin line it came from (`--each-line`; 0 for
/// the one prompt of a plain run) and the conversation, or the error that
/// line is answered with.
type Prompt = (usize, Result<Vec<Message>>);

/// `--each-line`: a thread reads stdin line by line and hands each
/// non-blank line over as its own conversation as soon as it is complete.
/// A line that is not UTF-8 or too long is handed over as its error.
fn each_line_source(args: &RunArgs) -> Result<mpsc::Receiver<Prompt>> {
    if args.messages.is_some() {
        bail!("--each-line answers stdin's lines, not --messages");
    }
    if std::io::stdin().is_terminal() {
        bail!("--each-line reads prompts from stdin, but nothing is piped in");
    }
    let prefix = args
        .prompt
        .as_deref()
        .map(|p| format!("{p}\n\n"))
        .unwrap_or_default();
    let system = args.answer.system.clone();
    Ok(input::spawn_line_reader(16, move |line| {
        let user = Message::new("user", format!("{prefix}{line}"));
        Ok(input::with_system(vec![user], system.as_deref()))
    }))
}

/// The one conversation to answer, from the argument, stdin or a file.
fn conversation(args: &RunArgs) -> Result<Vec<Message>> {
    let system = args.answer.system.as_deref();
    if let Some(path) = &args.messages {
        if args.prompt.is_some() {
            bail!("give either a prompt or --messages, not both");
        }
        let messages = input::with_system(input::read_messages(path)?, system);
        match messages.last() {
            Some(m) if m.role == "user" => {}
            _ => bail!("{}: the last message must be from the user", path.display()),
        }
        return Ok(messages);
    }
    let single = |user: String| input::with_system(vec![Message::new("user", user)], system);
    let stdin = input::piped_stdin()?;
    let stdin = stdin
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .filter(|s| !s.is_empty());
    let prompt = match (args.prompt.clone(), stdin) {
        (Some(p), Some(s)) => format!("{p}\n\n{s}"),
        (Some(p), None) => p,
        (None, Some(s)) => s,
        (None, None) => bail!("no prompt: give one as an argument, pipe one in, or use --messages"),
    };
    if prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    Ok(single(prompt))
}
