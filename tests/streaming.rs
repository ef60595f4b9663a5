//! What a streamed answer prints equals the tokenizer's decode of what the
//! model generated, byte for byte, through every front end: `run`
//! (streamed and `--json`), `chat`, stop texts; and a raw prompt's answer is
//! exactly the text that follows the prompt. The model is a scripted tiny
//! model (`common::write_scripted_model`) whose greedy answer is chosen.

mod common;

use common::{STARLING_TEMPLATE, load_tokenizer, ok, starling, write_scripted_model};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Mistral's byte-fallback tokens are `<0x00>` = 3 … `<0xFF>` = 258.
fn byte(b: u8) -> u32 {
    3 + b as u32
}

/// A scripted model answering `pieces` (token strings, or bytes as `<0xNN>`).
fn scripted(name: &str, pieces: &[&str]) -> (PathBuf, Vec<u32>) {
    let dir = common::scratch(name);
    // The tokenizer first (from a plain model), to look the pieces up.
    common::write_model(
        &dir,
        &common::golden()["config"],
        common::Tok::Json,
        Some(STARLING_TEMPLATE),
    );
    let tok = load_tokenizer(&dir);
    let ids: Vec<u32> = pieces
        .iter()
        .map(|p| tok.token_id(p).unwrap_or_else(|| panic!("no token {p:?}")))
        .collect();
    let end = tok.token_id("<|end_of_turn|>").unwrap();
    write_scripted_model(&dir, &ids, end, Some(STARLING_TEMPLATE));
    (dir, ids)
}

fn run(model: &Path, extra: &[&str], prompt: &str) -> String {
    let m = model.display().to_string();
    let mut args = vec!["run", "--model", &m, "--temperature", "0", "-n", "20"];
    args.extend(extra);
    args.push(prompt);
    ok(&starling(&args, None))
}

fn json(model: &Path, extra: &[&str], prompt: &str) -> Value {
    let mut args = vec!["--json"];
    args.extend(extra);
    serde_json::from_str(run(model, &args, prompt).trim()).unwrap()
}

#[test]
fn a_malformed_byte_run_does_not_swallow_the_rest_of_the_answer() {
    let (dir, ids) = scripted(
        "stream-bytes",
        &["<0xC3>", "<0xA9>", "<0xE2>", "▁x", "▁y", "▁z"],
    );
    assert_eq!(ids[..3], [byte(0xC3), byte(0xA9), byte(0xE2)]);
    let full = load_tokenizer(&dir).decode(&ids).unwrap();
    assert_eq!(
        full, "\u{FFFD}\u{FFFD}\u{FFFD} x y z",
        "the tokenizer's own decode"
    );

    let streamed = run(&dir, &[], "hi");
    assert_eq!(streamed, format!("{full}\n"));
    let line = json(&dir, &[], "hi");
    assert_eq!(line["response"], full.as_str());
    assert_eq!(line["gen_tokens"], 6);

    // chat streams through the same decoder.
    let m = dir.display().to_string();
    let chat = ok(&starling(
        &["chat", "--model", &m, "--temperature", "0", "-n", "20"],
        Some(b"hi\n"),
    ));
    assert_eq!(chat, format!("{full}\n"));

    // A stop text after the byte run is still found, and hides itself.
    let stopped = json(&dir, &["--stop", " y"], "hi");
    assert_eq!(stopped["response"], "\u{FFFD}\u{FFFD}\u{FFFD} x");
    assert_eq!(stopped["stop_reason"], "stop");
}

#[test]
fn valid_byte_runs_and_a_run_at_the_very_end_decode_whole() {
    // "é" (C3 A9), then "€" (E2 82 AC) cut short by the end of the answer.
    let (dir, ids) = scripted(
        "stream-bytes-end",
        &["▁a", "<0xC3>", "<0xA9>", "▁b", "<0xE2>", "<0x82>"],
    );
    let full = load_tokenizer(&dir).decode(&ids).unwrap();
    assert_eq!(full, "aé b\u{FFFD}\u{FFFD}");
    assert_eq!(run(&dir, &[], "hi"), format!("{full}\n"));
    assert_eq!(json(&dir, &[], "hi")["response"], full.as_str());
}

#[test]
fn a_raw_prompt_is_continued_with_its_leading_space() {
    let (dir, ids) = scripted("stream-raw", &["▁Content", "▁is", "<0xC3>", "<0xA9>"]);
    let tok = load_tokenizer(&dir);
    let prompt = "The quick brown fox";
    let raw = ["--template", "raw"];
    let streamed = run(&dir, &raw, prompt);
    let line = json(&dir, &raw, prompt);

    // The reference: decode(prompt + answer) minus decode(prompt).
    let prompt_ids = tok.encode_text(prompt).unwrap();
    let both: Vec<u32> = prompt_ids.iter().chain(&ids).copied().collect();
    let whole = tok.decode(&both).unwrap();
    let before = tok.decode(&prompt_ids).unwrap();
    let continuation = whole.strip_prefix(&before).unwrap();
    assert_eq!(continuation, " Content isé");
    assert_eq!(streamed, format!("{continuation}\n"));
    assert_eq!(line["response"], continuation);

    // A chat template starts the answer fresh, as before.
    assert_eq!(run(&dir, &[], prompt), "Content isé\n");
}
