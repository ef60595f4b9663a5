//! `starling run`: answer a prompt (argument, stdin, both, each stdin line,
//! or a whole conversation), streaming text or printing JSON.

use super::input;
use crate::cli::RunArgs;
use crate::engine::GenerateRequest;
use crate::template::{Message, Template};
use anyhow::{Context, Result, bail};
use std::io::Write;

pub fn run(args: &RunArgs) -> Result<()> {
    let conversations = conversations(args)?;
    let started = super::start_engine(&args.model, &args.device, &args.engine, 4)?;
    let sampling = args.sampling.resolve(&started.generation)?;
    let (engine, tokenizer) = (&started.engine, &started.tokenizer);
    if args.answer.verbose {
        eprintln!("{}", engine.describe());
    }

    // Every prompt is queued at once (the engine answers --parallel of them
    // together); answers are printed in input order, the first one streaming.
    let mut handles = Vec::with_capacity(conversations.len());
    let mut refused = None;
    for (line, messages) in &conversations {
        let submitted = started
            .template
            .encode(tokenizer, messages)
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
            Ok(handle) => handles.push((messages, handle)),
            Err(e) => {
                // The answers before it are still given, as when they ran one by one.
                refused = Some(e);
                break;
            }
        }
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (messages, handle) in handles {
        let outcome = if args.json {
            handle.wait(&mut |_| Ok(()), None)?
        } else {
            let outcome = handle.wait(
                &mut |piece| {
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                    Ok(())
                },
                None,
            )?;
            writeln!(out)?;
            outcome
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
            out.flush()?;
        }
        if args.answer.verbose {
            eprintln!("load_s={:.3} {}", started.load_s, outcome.stats.logfmt());
        }
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The conversations to answer, from the argument, stdin and files, with
/// the stdin line each came from (`--each-line`).
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
    if args.each_line {
        let Some(stdin) = stdin else {
            bail!("--each-line reads prompts from stdin, but nothing is piped in");
        };
        let prefix = args
            .prompt
            .as_deref()
            .map(|p| format!("{p}\n\n"))
            .unwrap_or_default();
        let lines: Vec<(Option<usize>, Vec<Message>)> = stdin
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| (Some(n + 1), single(format!("{prefix}{l}"))))
            .collect();
        if lines.is_empty() {
            bail!("--each-line: stdin holds no prompts");
        }
        return Ok(lines);
    }
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
