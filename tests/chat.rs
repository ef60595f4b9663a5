//! `starling chat`: non-terminal mode against `starling run --messages`,
//! the slash commands, the KV-cache reuse over six turns, context overflow,
//! and a real pseudo-terminal session with Ctrl-C and Ctrl-D.

mod common;

use candle_core::Device;
use common::{golden, tiny_model};
use starling::engine::{Chat, ChatSettings, Engine, EngineConfig, SamplerConfig, Stats};
use starling::template::Message;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn starling(args: &[&str], stdin: &[u8]) -> Output {
    common::starling(args, Some(stdin))
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

const GREEDY8: [&str; 4] = ["--temperature", "0", "-n", "8"];

fn chat(model: &Path, script: &str) -> Output {
    let m = model.display().to_string();
    let mut args = vec!["chat", "--model", &m];
    args.extend(GREEDY8);
    starling(&args, script.as_bytes())
}

/// What `run --messages` answers for a conversation (without the final newline).
fn run_messages(dir: &Path, messages: &[Message]) -> String {
    let path = dir.join("conv.json");
    std::fs::write(&path, serde_json::to_string(messages).unwrap()).unwrap();
    let m = tiny_model().display().to_string();
    let p = path.display().to_string();
    let mut args = vec!["run", "--model", &m, "--messages", &p];
    args.extend(GREEDY8);
    let out = stdout(&starling(&args, b""));
    out.strip_suffix('\n').unwrap().to_string()
}

#[test]
fn batch_mode_answers_exactly_as_run_messages() {
    let dir = common::scratch("chat-batch");
    let out = stdout(&chat(&tiny_model(), "Hello\n/retry\nHow are you today?\n"));
    let first = run_messages(&dir, &[Message::new("user", "Hello")]);
    let second = run_messages(
        &dir,
        &[
            Message::new("user", "Hello"),
            Message::new("assistant", first.clone()),
            Message::new("user", "How are you today?"),
        ],
    );
    assert_eq!(out, format!("{first}\n{first}\n{second}\n"));
    assert_ne!(first, second);
}

#[test]
fn save_load_undo_and_a_failed_load_keep_the_conversation() {
    let dir = common::scratch("chat-files");
    let saved = dir.join("saved.json");
    let script = format!(
        "Hello\n/save {0}\n/clear\n/load {0}\n/load {1}\nHow are you today?\n/undo\nHow are you today?\n",
        saved.display(),
        dir.join("missing.json").display()
    );
    let out = chat(&tiny_model(), &script);
    let text = stdout(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing.json"),
        "the failed /load says why: {stderr}"
    );
    let first = run_messages(&dir, &[Message::new("user", "Hello")]);
    let saved_msgs: Vec<Message> =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(
        saved_msgs,
        vec![
            Message::new("user", "Hello"),
            Message::new("assistant", first.clone())
        ]
    );
    let second = run_messages(
        &dir,
        &[
            Message::new("user", "Hello"),
            Message::new("assistant", first.clone()),
            Message::new("user", "How are you today?"),
        ],
    );
    // After /undo the same question gets the same (greedy) answer again.
    assert_eq!(text, format!("{first}\n{second}\n{second}\n"));
}

#[test]
fn unknown_commands_and_bad_settings_get_a_hint_and_the_chat_goes_on() {
    let out = chat(
        &tiny_model(),
        "/frobnicate\n/set temperature hot\n/set top_p 0\nHello\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown command /frobnicate; /help lists them"),
        "{stderr}"
    );
    assert!(
        stderr.contains("temperature: \"hot\" is not a valid value"),
        "{stderr}"
    );
    assert!(stderr.contains("top_p must be in (0, 1]"), "{stderr}");
    assert!(!stdout(&out).is_empty(), "Hello was answered");
}

fn library_chat(model: &Path) -> Chat {
    let files = starling::source::local_dir(model).unwrap();
    let loaded = starling::loader::load(
        &files,
        "auto",
        starling::loader::DTypeChoice::Auto,
        None,
        &Device::Cpu,
        false,
    )
    .unwrap();
    let settings = ChatSettings {
        sampling: SamplerConfig {
            temperature: 0.0,
            ..SamplerConfig::default()
        },
        max_tokens: 8,
        stop_texts: vec![],
    };
    let text = loaded.text;
    let tokenizer = std::sync::Arc::new(text.tokenizer);
    let engine = Engine::start(
        loaded.model,
        Some(tokenizer.clone()),
        EngineConfig::default(),
    )
    .unwrap();
    Chat::new(engine, tokenizer, text.template, text.stop_ids, settings)
}

#[test]
fn six_turns_feed_only_new_tokens_and_match_a_from_scratch_run() {
    let mut warm = library_chat(&tiny_model());
    let questions = [
        "Hello",
        "Tell me more",
        "Why?",
        "And then?",
        "Are you sure?",
        "Thanks",
    ];
    let mut stats: Vec<Stats> = Vec::new();
    for (n, q) in questions.iter().enumerate() {
        let report = warm.say(q, &mut |_| Ok(()), None).unwrap();
        // From scratch: a new session given the same conversation re-encodes everything.
        let mut cold = library_chat(&tiny_model());
        let mut transcript = warm.transcript();
        transcript.pop();
        cold.load(transcript).unwrap();
        let fresh = cold.retry(&mut |_| Ok(()), None).unwrap();
        assert_eq!(
            report.text,
            fresh.text,
            "turn {}: cached and from-scratch answers differ",
            n + 1
        );
        assert_eq!(
            fresh.stats.new_tokens, fresh.stats.prompt_tokens,
            "a fresh session reads everything"
        );
        stats.push(report.stats);
    }
    for n in 1..stats.len() {
        let (prev, cur) = (&stats[n - 1], &stats[n]);
        // The whole previous prompt stays cached: only the last answer's
        // re-rendering, the template's overhead and the new message are fed.
        assert!(
            cur.cached_tokens >= prev.prompt_tokens,
            "turn {}: {cur:?} after {prev:?}",
            n + 1
        );
        assert_eq!(cur.new_tokens, cur.prompt_tokens - cur.cached_tokens);
        assert!(cur.new_tokens <= cur.prompt_tokens - prev.prompt_tokens);
    }
    let last = stats.last().unwrap();
    assert!(
        last.new_tokens * 3 < last.prompt_tokens,
        "turn 6 should feed a fraction of its prompt: {last:?}"
    );
}

#[test]
fn a_long_conversation_in_a_small_context_keeps_answering() {
    let dir = common::scratch("chat-small");
    let mut config = golden()["config"].clone();
    config["max_position_embeddings"] = 96.into();
    common::write_model(&dir, &config, common::Tok::SentencePiece, None);
    let script: String = (1..=10)
        .map(|i| format!("Tell me about item number {i}\n"))
        .collect();
    let m = dir.display().to_string();
    let out = starling(
        &[
            "chat",
            "--model",
            &m,
            "--temperature",
            "0",
            "-n",
            "8",
            "--verbose",
        ],
        script.as_bytes(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("gen_tokens=").count(),
        10,
        "every turn answered: {stderr}"
    );
    assert!(stderr.contains("left the window"), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

#[test]
fn a_message_longer_than_the_context_is_refused_and_the_chat_goes_on() {
    let dir = common::scratch("chat-tiny-ctx");
    let mut config = golden()["config"].clone();
    config["max_position_embeddings"] = 40.into();
    common::write_model(&dir, &config, common::Tok::SentencePiece, None);
    let script = format!("{}\nHello\n", "word ".repeat(60));
    let out = chat(&dir, &script);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the message is too long"), "{stderr}");
    assert!(
        !out.status.success(),
        "a failed turn makes the exit code non-zero"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "Hello was still answered"
    );
}

/// A refused message leaves the conversation as it was (the exchanges
/// dropped while trying to fit it come back), and a message that fits with
/// its answer exactly is not refused.
#[test]
fn a_refused_message_keeps_the_history_and_an_exact_fit_is_answered() {
    let m = tiny_model().display().to_string();
    let verbose = |script: &str| {
        let args = ["chat", "--model", &m, "--temperature", "0", "-n", "8"];
        let out = starling(
            &[&args[..], &["--ctx-size", "64", "--verbose"]].concat(),
            script.as_bytes(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        // The token counts (not the timings) of the last turn.
        let last: Vec<String> = stderr
            .lines()
            .rfind(|l| l.contains("prompt_tokens="))
            .unwrap()
            .split(' ')
            .take(3)
            .map(String::from)
            .collect();
        (stdout_lossy(&out), last)
    };
    let long = "word ".repeat(60);
    let (with_refusal, stats_after) = verbose(&format!("one\n{long}\ntwo words\n"));
    let (without, stats_plain) = verbose("one\ntwo words\n");
    assert_eq!(stats_after, stats_plain);
    assert_eq!(with_refusal, without);
    // "Hello" renders to 17 tokens: 17 + 4 - 1 = 20 positions hold it and a 4-token answer.
    let args = [
        "chat",
        "--model",
        &m,
        "--temperature",
        "0",
        "-n",
        "4",
        "--ctx-size",
        "20",
    ];
    let out = starling(&args, b"Hello\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

fn stdout_lossy(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A reader that goes away (`| head -1`) ends the chat quietly, at once,
/// with success, as it does `run`.
#[test]
fn a_closed_stdout_ends_the_chat_quietly() {
    let m = tiny_model().display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["chat", "--model", &m, "--temperature", "0", "-n", "16"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let lines = "tell me more\n".repeat(200);
        let _ = stdin.write_all(lines.as_bytes());
    });
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    drop(out);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

#[test]
fn terminal_session_with_retry_undo_save_load_ctrl_c_and_ctrl_d() {
    use rexpect::session::spawn_command;
    let home = common::scratch("chat-pty");
    let saved = home.join("pty.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_starling"));
    cmd.args([
        "chat",
        "--model",
        &tiny_model().display().to_string(),
        "-n",
        "8",
        "--temperature",
        "0.9",
    ])
    .env("HOME", &home)
    .env("XDG_DATA_HOME", home.join("data"))
    .env("NO_COLOR", "1");
    let mut p = spawn_command(cmd, Some(30_000)).unwrap();
    let ids = common::ids(&golden()["cases"][0]["greedy"]["ids"]);
    let tok = library_chat(&tiny_model());
    let greedy8 = tok.tokenizer().decode(&ids[..8]).unwrap();
    // rexpect reads bytes as Latin-1, so expect the answer's longest ASCII run
    // (the saved file below checks the whole text).
    let marker = greedy8
        .split(|c: char| !c.is_ascii())
        .max_by_key(|s| s.len())
        .unwrap()
        .to_string();
    assert!(marker.len() >= 8, "{marker:?}");

    p.exp_string(">>> ").unwrap();
    p.send_line("/set temperature 0").unwrap();
    p.exp_string("(temperature = 0)").unwrap();
    p.send_line("Hello").unwrap();
    p.exp_string(&marker).unwrap();
    p.exp_string(">>> ").unwrap();
    p.send_line("/retry").unwrap();
    p.exp_string(&marker).unwrap();
    p.send_line("/undo").unwrap();
    p.exp_string("(dropped the last exchange)").unwrap();
    p.send_line("Hello").unwrap();
    p.exp_string(&marker).unwrap();
    p.send_line(&format!("/save {}", saved.display())).unwrap();
    p.exp_string("(saved 2 messages").unwrap();
    p.send_line(&format!("/load {}", saved.display())).unwrap();
    p.exp_string("(loaded 2 messages").unwrap();

    // A long answer, interrupted: the prompt comes back and the next turn works.
    p.send_line("/set max_tokens 6000").unwrap();
    p.exp_string("(max_tokens = 6000)").unwrap();
    p.send_line("Tell me a very long story").unwrap();
    p.exp_string("story").unwrap(); // the echo: the answer is under way
    std::thread::sleep(std::time::Duration::from_millis(500));
    p.send_control('c').unwrap();
    p.exp_string("(interrupted)").unwrap();
    p.exp_string(">>> ").unwrap();
    p.send_line("/set max_tokens 8").unwrap();
    p.exp_string("(max_tokens = 8)").unwrap();
    p.send_line("/show").unwrap();
    p.exp_string("context: ").unwrap();
    p.send_line("How are you today?").unwrap();
    p.exp_string("How are you today?").unwrap(); // the echo; the answer follows
    p.exp_string(">>> ").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();

    let history = std::fs::read_to_string(home.join("data/starling/history")).unwrap();
    assert!(history.contains("Tell me a very long story"), "{history}");
    let saved: Vec<Message> =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(saved[1].content, greedy8);
}

#[test]
fn piped_input_that_ends_inside_a_block_or_continuation_is_the_last_turn() {
    let dir = common::scratch("chat-eof-block");
    let first = run_messages(&dir, &[Message::new("user", "Hi")]);
    let block = run_messages(
        &dir,
        &[
            Message::new("user", "Hi"),
            Message::new("assistant", first.clone()),
            Message::new("user", "line one\nline two"),
        ],
    );
    let out = stdout(&chat(&tiny_model(), "Hi\n\"\"\"\nline one\nline two\n"));
    assert_eq!(out, format!("{first}\n{block}\n"));

    let continued = run_messages(&dir, &[Message::new("user", "one \ntwo ")]);
    let out = stdout(&chat(&tiny_model(), "one \\\ntwo \\\n"));
    assert_eq!(out, format!("{continued}\n"));
}

#[test]
fn a_block_or_continued_line_is_a_message_even_when_it_starts_with_a_slash() {
    let dir = common::scratch("chat-slash-block");
    let answer = run_messages(&dir, &[Message::new("user", "/exit\n/help")]);
    let out = stdout(&chat(&tiny_model(), "\"\"\"\n/exit\n/help\n\"\"\"\n"));
    assert_eq!(out, format!("{answer}\n"));
    let out = stdout(&chat(&tiny_model(), "/exit \\\n/help\n"));
    let continued = run_messages(&dir, &[Message::new("user", "/exit \n/help")]);
    assert_eq!(out, format!("{continued}\n"));
}
