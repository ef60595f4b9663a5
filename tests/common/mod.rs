//! Shared by the integration tests: the real Mistral tokenizer (fetched once
//! by scripts/fetch-test-assets.sh and cached under target/), the golden
//! figures, and tiny model directories built from the deterministic-weights
//! spec. Nothing here mocks the model.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// tokenizer.model.v1 from the mistral-common wheel, fetched on first use.
pub fn tokenizer_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::var_os("STARLING_TEST_ASSETS")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target/test-assets"));
        let path = dir.join("tokenizer.model.v1");
        if !path.is_file() {
            let status = Command::new("bash")
                .arg(root().join("scripts/fetch-test-assets.sh"))
                .status()
                .expect("running scripts/fetch-test-assets.sh");
            assert!(status.success(), "scripts/fetch-test-assets.sh failed");
        }
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            493_443,
            "{} has the wrong size",
            path.display()
        );
        path
    })
    .clone()
}

pub fn golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let text =
            std::fs::read_to_string(root().join("tests/data/golden-tiny-mistral.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

pub fn corpus() -> Value {
    let text = std::fs::read_to_string(root().join("tests/data/tokenizer-corpus.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The golden config, with `edit` applied to its JSON.
pub fn config_json(edit: impl FnOnce(&mut Value)) -> Value {
    let mut config = golden()["config"].clone();
    edit(&mut config);
    config
}

/// Starling-LM-7B-beta's chat_template.
pub const STARLING_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() + ': ' + message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tok {
    /// tokenizer.model + tokenizer_config.json (the declare-lab shape).
    SentencePiece,
    /// tokenizer.json only, as the Starling-LM repos ship it.
    Json,
}

/// The OpenChat tokenizer_config.json: added tokens, and optionally the chat template.
pub fn tokenizer_config(chat_template: Option<&str>) -> Value {
    let mut config = serde_json::json!({
        "added_tokens_decoder": {
            "32000": {"content": "<|end_of_turn|>", "special": true},
            "32001": {"content": "<|pad_0|>", "special": true}
        },
        "bos_token": "<s>",
        "eos_token": "<|end_of_turn|>"
    });
    if let Some(t) = chat_template {
        config["chat_template"] = Value::String(t.to_string());
    }
    config
}

/// Writes a complete model directory: config, deterministic f32 weights, tokenizer.
pub fn write_model(dir: &Path, config: &Value, tok: Tok, chat_template: Option<&str>) {
    std::fs::create_dir_all(dir).unwrap();
    let text = serde_json::to_string_pretty(config).unwrap();
    std::fs::write(dir.join("config.json"), &text).unwrap();
    let parsed = starling::model::Config::from_json(&text).unwrap();
    starling::model::synthetic::write_safetensors(&parsed, dir).unwrap();
    let tok_config = tokenizer_config(chat_template);
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
    std::fs::copy(tokenizer_model(), dir.join("tokenizer.model")).unwrap();
    if tok == Tok::Json {
        // tokenizer.json from the native conversion, then drop tokenizer.model
        // so the directory can only be read through tokenizer.json.
        let files = starling::source::local_dir(dir).unwrap();
        let cfg =
            starling::tokenizer::TokenizerConfig::from_file(&dir.join("tokenizer_config.json"))
                .unwrap();
        let t = starling::tokenizer::TextTokenizer::load(&files.tokenizer, Some(&cfg)).unwrap();
        t.inner().save(dir.join("tokenizer.json"), false).unwrap();
        std::fs::remove_file(dir.join("tokenizer.model")).unwrap();
    }
}

/// A scratch directory for this test binary, under cargo's target tmpdir.
pub fn scratch(name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{}", name, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The golden tiny Mistral with the real tokenizer (tokenizer.model), built once per test binary.
pub fn tiny_model() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("tiny-mistral");
        write_model(&dir, &golden()["config"], Tok::SentencePiece, None);
        dir
    })
    .clone()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
