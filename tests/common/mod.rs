//! Shared by the integration tests: the real Mistral tokenizer (fetched once
//! by scripts/fetch-test-assets.sh and cached under target/), the golden
//! figures, and tiny model directories built from the deterministic-weights
//! spec. Nothing here mocks the model.
#![allow(dead_code)]

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn assets_dir() -> PathBuf {
    std::env::var_os("STARLING_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/test-assets"))
}

fn fetch_assets() {
    let status = Command::new("bash")
        .arg(root().join("scripts/fetch-test-assets.sh"))
        .status()
        .expect("running scripts/fetch-test-assets.sh");
    assert!(status.success(), "scripts/fetch-test-assets.sh failed");
}

/// Real chat templates (llama.cpp's collection), fetched on first use.
pub fn templates_dir() -> PathBuf {
    let dir = assets_dir().join("templates");
    if !dir.join(".complete").is_file() {
        fetch_assets();
    }
    dir
}

/// llama.cpp's vocabulary test files (`ggml-vocab-*.gguf`, `.inp`, `.out`),
/// fetched on first use.
#[allow(dead_code)]
pub fn vocab_dir() -> PathBuf {
    let dir = assets_dir().join("vocab");
    if !dir.join(".complete").is_file() {
        fetch_assets();
    }
    dir
}

/// The Python of the virtual environment that holds the official `openai`
/// client (scripts/openai-requirements.txt), installed on first use.
#[allow(dead_code)]
pub fn openai_python() -> PathBuf {
    let python = assets_dir().join("openai-venv/bin/python");
    if !assets_dir().join("openai-venv/.complete").is_file() {
        fetch_assets();
    }
    python
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
/// The directories are named after the process; the first call in a
/// process removes those of test processes that have ended (a test binary
/// cannot clean up at exit, and a day of runs left 18 GB behind).
pub fn scratch(name: &str) -> PathBuf {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(remove_dead_scratch);
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{}", name, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes `NAME-PID` scratch directories whose process is gone (Linux:
/// no `/proc/PID`). Running test binaries keep theirs.
fn remove_dead_scratch() {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((_, pid)) = name.to_str().and_then(|n| n.rsplit_once('-')) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !proc.join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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

/// Writes f32 tensors as a PyTorch checkpoint (`torch.save` of a state dict):
/// a zip holding `archive/data.pkl` (pickle protocol 2: an OrderedDict of
/// `torch._utils._rebuild_tensor_v2` calls on persistent storages) and one
/// raw little-endian storage file per tensor. No torch needed.
pub fn save_pytorch_f32(tensors: &[(String, Vec<usize>, Vec<f32>)], path: &Path) {
    use std::io::Write;
    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn int(out: &mut Vec<u8>, v: usize) {
        out.push(b'J');
        out.extend((v as i32).to_le_bytes());
    }
    fn global(out: &mut Vec<u8>, module: &str, name: &str) {
        out.extend(format!("c{module}\n{name}\n").as_bytes());
    }
    fn int_tuple(out: &mut Vec<u8>, values: &[usize]) {
        out.push(b'(');
        for &v in values {
            int(out, v);
        }
        out.push(b't');
    }
    let mut pkl = vec![0x80, 2];
    global(&mut pkl, "collections", "OrderedDict");
    pkl.extend(b")R(");
    for (key, (name, shape, _)) in tensors.iter().enumerate() {
        unicode(&mut pkl, name);
        global(&mut pkl, "torch._utils", "_rebuild_tensor_v2");
        pkl.extend(b"((");
        unicode(&mut pkl, "storage");
        global(&mut pkl, "torch", "FloatStorage");
        unicode(&mut pkl, &key.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, shape.iter().product());
        pkl.extend(b"tQ");
        int(&mut pkl, 0);
        int_tuple(&mut pkl, shape);
        let strides: Vec<usize> = (0..shape.len())
            .map(|d| shape[d + 1..].iter().product())
            .collect();
        int_tuple(&mut pkl, &strides);
        pkl.push(0x89);
        global(&mut pkl, "collections", "OrderedDict");
        pkl.extend(b")RtR");
    }
    pkl.extend(b"u.");

    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(&pkl).unwrap();
    for (key, (_, _, values)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), stored)
            .unwrap();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        zip.write_all(&bytes).unwrap();
    }
    zip.start_file("archive/version", stored).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// The declare-lab/starling-7B shape: sharded PyTorch .bin weights with an
/// index, tokenizer.model only (no tokenizer.json), no chat_template.
pub fn write_pytorch_twin(dir: &Path) {
    write_model(dir, &golden()["config"], Tok::SentencePiece, None);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let cfg = starling::model::Config::from_json(&golden()["config"].to_string()).unwrap();
    let tensors = starling::model::synthetic::tensors(&cfg);
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("pytorch_model-00001-of-00002.bin", a),
        ("pytorch_model-00002-of-00002.bin", b),
    ] {
        save_pytorch_f32(part, &dir.join(file));
        for (name, _, _) in part {
            map.insert(name.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("pytorch_model.bin.index.json"), index.to_string()).unwrap();
}

/// Runs the real binary with `args` (and `stdin`, else none).
pub fn starling(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_starling"));
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("starting starling");
    // Stdin is written from a thread while the output is read (a large
    // input and output would otherwise fill both pipes); a process that
    // stops reading early (a refused input) is not the writer's failure.
    let writer = stdin.map(|input| {
        let input = input.to_vec();
        let mut pipe = child.stdin.take().unwrap();
        std::thread::spawn(move || match pipe.write_all(&input) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("writing stdin: {e}"),
            _ => {}
        })
    });
    let out = child.wait_with_output().unwrap();
    if let Some(w) = writer {
        w.join().unwrap();
    }
    out
}

/// The real binary with `args` running with its stdin open for the test to
/// write (`Child::stdin`), its stdout as lines arriving on the receiver (as
/// the run prints them), and its stderr kept for `wait_with_output`.
pub fn starling_talking(args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting starling");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Stdout of a run that must succeed.
pub fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "starling failed: {stderr}");
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

/// Asserts a clean failure: non-zero exit, one `error:` line containing `needle`, no panic.
pub fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a failure mentioning {needle:?}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

/// A tiny model whose greedy answer to any prompt is exactly `answer`, then
/// `end`: the golden model's shape and tokenizer with every `o_proj` and
/// `down_proj` zeroed (each layer passes its input through), each answer
/// token's embedding a one-hot, and `lm_head` mapping each answer token to
/// the next. Every other token embeds as one-hot 0, which maps to
/// `answer[0]`. The ids in `answer` must be distinct, at most hidden - 2.
pub fn write_scripted_model(dir: &Path, answer: &[u32], end: u32, chat_template: Option<&str>) {
    let config = golden()["config"].clone();
    write_model(dir, &config, Tok::Json, chat_template);
    let parsed = starling::model::Config::from_json(&config.to_string()).unwrap();
    let hidden = parsed.hidden_size;
    let vocab = parsed.vocab_size;
    assert!(answer.len() + 2 <= hidden, "answer too long for the script");
    let mut tensors = starling::model::synthetic::tensors(&parsed);
    for (name, _, values) in &mut tensors {
        if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            values.fill(0.0);
        } else if name == "model.norm.weight" {
            values.fill(1.0);
        } else if name == "model.embed_tokens.weight" {
            values.fill(0.0);
            for t in 0..vocab {
                values[t * hidden] = 1.0;
            }
            for (j, &t) in answer.iter().enumerate() {
                let row = &mut values[t as usize * hidden..][..hidden];
                row.fill(0.0);
                row[j + 1] = 1.0;
            }
        } else if name == "lm_head.weight" {
            values.fill(0.0);
            // Dimension d holds "the previous token was step d - 1".
            let next: Vec<u32> = answer.iter().copied().chain([end]).collect();
            for (d, &t) in next.iter().enumerate() {
                values[t as usize * hidden + d] = 10.0;
            }
        }
    }
    starling::model::synthetic::save_f32(&tensors, &dir.join("model.safetensors")).unwrap();
}

/// The tokenizer of a model directory, as the CLI loads it.
pub fn load_tokenizer(dir: &Path) -> starling::tokenizer::TextTokenizer {
    let files = starling::source::local_dir(dir).unwrap();
    let cfg = starling::tokenizer::TokenizerConfig::from_file(&dir.join("tokenizer_config.json"))
        .unwrap();
    starling::tokenizer::TextTokenizer::load(&files.tokenizer, Some(&cfg)).unwrap()
}

/// tests/data/reward-reference.json (scripts/reference-reward.py).
#[allow(dead_code)]
pub fn reward_reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| {
        let text =
            std::fs::read_to_string(root().join("tests/data/reward-reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

#[allow(dead_code)]
pub fn reward_config(name: &str) -> &'static Value {
    &reward_reference()["configs"][name]
}

#[allow(dead_code)]
pub enum Format {
    Safetensors,
    Pickle,
}

/// A tokenizer directory: tokenizer.json converted from the Mistral v0.1
/// SentencePiece model, plus `added` special tokens from 32000 on.
#[allow(dead_code)]
pub fn write_tokenizer(dir: &Path, added: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    let decoder: serde_json::Map<String, Value> = added
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                (32000 + i).to_string(),
                serde_json::json!({"content": t, "special": true}),
            )
        })
        .collect();
    let config = serde_json::json!({
        "added_tokens_decoder": decoder,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::copy(tokenizer_model(), dir.join("tokenizer.model")).unwrap();
    let files = starling::source::tokenizer_dir(dir).unwrap();
    let t = starling::reward::load_tokenizer(&files).unwrap();
    t.inner().save(dir.join("tokenizer.json"), false).unwrap();
    std::fs::remove_file(dir.join("tokenizer.model")).unwrap();
}

/// A reward-model directory of config `name`, its trunk under each of
/// `prefixes` (the first also carries `v_head`), without a tokenizer.
#[allow(dead_code)]
pub fn write_reward_model(dir: &Path, name: &str, prefixes: &[&str], format: Format) {
    std::fs::create_dir_all(dir).unwrap();
    let text = reward_config(name).to_string();
    std::fs::write(dir.join("config.json"), &text).unwrap();
    let parsed = starling::model::Config::from_json(&text).unwrap();
    let mut tensors = Vec::new();
    for (i, prefix) in prefixes.iter().enumerate() {
        for t in starling::model::synthetic::reward_tensors(&parsed, prefix) {
            if i == 0 || t.0 != "v_head.weight" {
                tensors.push(t);
            }
        }
    }
    match format {
        Format::Safetensors => {
            starling::model::synthetic::save_f32(&tensors, &dir.join("model.safetensors")).unwrap()
        }
        Format::Pickle => save_pytorch_f32(&tensors, &dir.join("pytorch_model.bin")),
    }
}

/// A greedy request (temperature 0) for `max_tokens` after `prompt`.
pub fn greedy_request(max_tokens: usize, prompt: Vec<u32>) -> starling::engine::GenerateRequest {
    starling::engine::GenerateRequest {
        prompt,
        sampling: starling::engine::SamplerConfig {
            temperature: 0.0,
            ..starling::engine::SamplerConfig::default()
        },
        max_tokens,
        stop_ids: vec![],
        stop_texts: vec![],
        continuation: false,
        logprobs: None,
    }
}
