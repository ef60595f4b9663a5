//! `starling run`: answer a prompt (argument, stdin, both, each stdin line,
//! or a whole conversation), streaming text or printing JSON.

use super::input;
use crate::cli::RunArgs;
use crate::engine::{Event, GenerateRequest, Handle};
use crate::template::{Message, Template};
use anyhow::{Context, Result, bail};
use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::mpsc::{self, TryRecvError};

pub fn run(args: &RunArgs) -> Result<()> {
    if let Some(n) = args.best_of.best_of {
        if args.each_line {
            bail!("--best-of answers one prompt; it does not combine with --each-line");
        }
        let (_, conversation) = conversations(args)?.pop().expect("one conversation");
        return super::best_of::run(args, n, conversation);
    }
    // Bad input fails before the model loads: everything but `--each-line`'s
    // stdin, which is read as it comes (lines are answered as they arrive,
    // so `tail -f log | starling run --each-line` works).
    let prompts = if args.each_line {
        each_line_source(args)?
    } else {
        let (tx, rx) = mpsc::channel();
        for c in conversations(args)? {
            let _ = tx.send(Ok(c));
        }
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
    // streaming. A refused prompt stops the intake: the answers before it
    // are still given, as when they ran one by one.
    let mut pending: VecDeque<(Vec<Message>, Handle)> = VecDeque::new();
    let mut open = true;
    let mut refused = None;
    let mut any = false;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    loop {
        while open && refused.is_none() {
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
            let Some(next) = next else {
                open = false;
                break;
            };
            let (line, messages) = match next {
                Ok(prompt) => prompt,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            };
            any = true;
            let submitted = started
                .template
                .encode(tokenizer, &messages)
                .and_then(|prompt| {
                    engine.submit(GenerateRequest {
                        prompt,
                        // Each prompt starts from the seed, so an answer never depends on the others.
                        sampling: sampling.clone(),
                        max_tokens: args.sampling.max_tokens,
                        stop_ids: started.stop_ids.clone(),
                        stop_texts: args.answer.stop.clone(),
                        // A raw prompt is continued, not answered: keep the first space.
                        continuation: matches!(started.template, Template::Raw),
                        logprobs: None,
                    })
                });
            let submitted = match line {
                Some(n) => submitted.with_context(|| format!("line {n} of standard input")),
                None => submitted,
            };
            match submitted {
                Ok(handle) => pending.push_back((messages, handle)),
                Err(e) => refused = Some(e),
            }
        }
        let Some((messages, handle)) = pending.front() else {
            if open && refused.is_none() {
                continue;
            }
            break;
        };
        // The first answer streams for a moment; then stdin is looked at again.
        let outcome = match handle.recv_timeout(std::time::Duration::from_millis(20))? {
            Some(Event::Text(piece)) => {
                if !args.json {
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                }
                continue;
            }
            Some(Event::Failed(e)) => return Err(e),
            Some(Event::Token { .. }) | None => continue,
            Some(Event::Finished(outcome)) => outcome,
        };
        if args.json {
            let line = serde_json::json!({
                "prompt": messages.last().map(|m| m.content.as_str()).unwrap_or_default(),
                "response": outcome.text,
                "stop_reason": outcome.stop.as_str(),
                "prompt_tokens": outcome.stats.prompt_tokens,
                "gen_tokens": outcome.stats.gen_tokens,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out)?;
        }
        out.flush()?;
        if args.answer.verbose {
            eprintln!("load_s={:.3} {}", started.load_s, outcome.stats.logfmt());
        }
        pending.pop_front();
    }
    match refused {
        Some(e) => Err(e),
        None if !any => bail!("--each-line: stdin holds no prompts"),
        None => Ok(()),
    }
}

/// A prompt to answer: the stdin line it came from (`--each-line`) and the
/// conversation; an error for input that cannot be a prompt.
type Prompt = Result<(Option<usize>, Vec<Message>)>;

/// `--each-line`: a thread reads stdin line by line and hands each
/// non-blank line over as its own conversation as soon as it is complete.
/// A line that is not UTF-8 ends the intake with an error naming it.
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
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut bytes = Vec::new();
        for n in 1.. {
            bytes.clear();
            let prompt = match input::read_line_bounded(
                &mut stdin,
                &mut bytes,
                &format!("line {n} of standard input"),
            ) {
                Ok(0) => return,
                Ok(_) => match std::str::from_utf8(&bytes) {
                    Ok(line) => {
                        let line = line.trim_end_matches(['\n', '\r']);
                        if line.trim().is_empty() {
                            continue;
                        }
                        let user = Message::new("user", format!("{prefix}{line}"));
                        Ok((Some(n), input::with_system(vec![user], system.as_deref())))
                    }
                    Err(e) => Err(anyhow::anyhow!(
                        "line {n} of standard input is not valid UTF-8 (invalid byte at column {})",
                        e.valid_up_to() + 1
                    )),
                },
                Err(e) => Err(e),
            };
            let last = prompt.is_err();
            if tx.send(prompt).is_err() || last {
                return;
            }
        }
    });
    Ok(rx)
}

/// The one conversation to answer, from the argument, stdin or a file
/// (the line is `None`: it is not `--each-line`'s).
fn conversations(args: &RunArgs) -> Result<Vec<(Option<usize>, Vec<Message>)>> {
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
        return Ok(vec![(None, messages)]);
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
    Ok(vec![(None, single(prompt))])
}
