//! Reward models (`starling score`, `run --best-of`) on tiny reward models
//! built from tests/reward-weights.md, against the model cards' classes as
//! scripts/reference-reward.py computes them (tests/data/reward-reference.json).

mod common;

use common::{Format, fails_with, ok, reward_reference as reference, starling};
use common::{write_reward_model, write_tokenizer};
use serde_json::{Value, json};
use starling::cli::RewardArgs;
use starling::commands::score::load_reward;
use starling::loader::DTypeChoice;
use starling::reward::RewardModel;
use starling::template::Message;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The two reference models: the 7B shape as its repo is (one
/// pytorch_model.bin holding the trunk as `model.model.*` and
/// `transformer.*`, no tokenizer: `--tokenizer` gives it), the 34B shape as
/// safetensors under `transformer.*` with its tokenizer inside.
struct Models {
    rm7: PathBuf,
    llama_tokenizer: PathBuf,
    rm34: PathBuf,
}

fn models() -> &'static Models {
    static MODELS: OnceLock<Models> = OnceLock::new();
    MODELS.get_or_init(|| {
        let root = common::scratch("reward-models");
        let m = Models {
            rm7: root.join("rm-7b"),
            llama_tokenizer: root.join("llama-tokenizer"),
            rm34: root.join("rm-34b"),
        };
        write_reward_model(
            &m.rm7,
            "rm-7b-shape",
            &["model.model", "transformer"],
            Format::Pickle,
        );
        write_tokenizer(&m.llama_tokenizer, &[]);
        write_reward_model(
            &m.rm34,
            "rm-34b-shape",
            &["transformer"],
            Format::Safetensors,
        );
        write_tokenizer(&m.rm34, &["<|im_start|>", "<|im_end|>"]);
        m
    })
}

fn args(dir: &Path, tokenizer: Option<&Path>, template: &str, readout: &str) -> RewardArgs {
    RewardArgs {
        model: dir.display().to_string(),
        tokenizer: tokenizer.map(|t| t.display().to_string()),
        template: template.into(),
        readout: readout.into(),
        offline: true,
        for_best_of: false,
    }
}

fn load(model: &str, readout: &str) -> RewardModel {
    let m = models();
    let a = match model {
        "rm-7b-shape" => args(&m.rm7, Some(&m.llama_tokenizer), "llama2-rm", readout),
        _ => args(&m.rm34, None, "chatml-rm", readout),
    };
    load_reward(&a, DTypeChoice::Auto, None, &candle_core::Device::Cpu).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

fn close(a: f32, b: f64) -> bool {
    (a as f64 - b).abs() <= 1e-4
}

#[test]
fn ids_and_scores_match_the_model_cards_code() {
    for model in ["rm-7b-shape", "rm-34b-shape"] {
        let last = load(model, "last");
        let card = load(model, "card");
        for case in reference()["cases"].as_array().unwrap() {
            if case["model"] != model {
                continue;
            }
            let conv = messages(&case["messages"]);
            let ids = last.encode(&conv).unwrap();
            assert_eq!(ids, common::ids(&case["ids"]), "{model}: ids of {conv:?}");
            let (want_last, want_card) = (
                case["score_last"].as_f64().unwrap(),
                case["score_card"].as_f64().unwrap(),
            );
            let got_last = last.score(&conv).unwrap();
            let got_card = card.score(&conv).unwrap();
            assert!(
                close(got_last, want_last),
                "{model} last: {got_last} vs {want_last}"
            );
            assert!(
                close(got_card, want_card),
                "{model} card: {got_card} vs {want_card}"
            );
        }
    }
}

#[test]
fn left_truncation_keeps_the_answer_and_drops_the_start() {
    let rm = load("rm-7b-shape", "last");
    let long = reference()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["model"] == "rm-7b-shape" && c["ids"].as_array().unwrap().len() == 2048)
        .expect("a case longer than 2048 tokens");
    let conv = messages(&long["messages"]);
    let ids = rm.encode(&conv).unwrap();
    assert_eq!(ids.len(), 2048);
    assert_eq!(ids[0], 1, "the automatic BOS is added after the cut");
    assert_ne!(ids[1], 1, "the card's own <s> was at the start, and is cut");
    // The answer and its </s> are whole at the end.
    let answer = rm
        .tokenizer
        .encode_text(&conv[1].content)
        .unwrap()
        .into_iter()
        .skip(1)
        .collect::<Vec<_>>();
    assert!(ids[..ids.len() - 1].ends_with(&answer), "the answer stays");
    assert_eq!(*ids.last().unwrap(), 2);
}

#[test]
fn every_accepted_trunk_prefix_gives_the_same_reward() {
    let m = models();
    let case = &reference()["cases"][0];
    let want = case["score_last"].as_f64().unwrap();
    let conv = messages(&case["messages"]);
    let root = common::scratch("reward-prefixes");
    // (directory, prefixes stored, the one read: transformer over model.model over model)
    let layouts: [(&str, &[&str], &str); 4] = [
        ("transformer", &["transformer"], "transformer"),
        ("model-model", &["model.model"], "model.model"),
        ("model", &["model"], "model"),
        (
            "model-and-transformer",
            &["model", "transformer"],
            "transformer",
        ),
    ];
    for (name, prefixes, read) in layouts {
        let dir = root.join(name);
        write_reward_model(&dir, "rm-7b-shape", prefixes, Format::Safetensors);
        let rm = load_reward(
            &args(&dir, Some(&m.llama_tokenizer), "llama2-rm", "last"),
            DTypeChoice::Auto,
            None,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(rm.trunk, read, "{name}");
        let got = rm.score(&conv).unwrap();
        assert!(close(got, want), "{name}: {got} vs {want}");
    }
}

#[test]
fn files_that_are_not_reward_models_are_refused_by_name() {
    let m = models();
    let root = common::scratch("reward-bad");
    let tok = m.llama_tokenizer.display().to_string();
    let run = |dir: &Path| {
        let conv = root.join("conv.json");
        std::fs::write(
            &conv,
            r#"[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]"#,
        )
        .unwrap();
        starling(
            &[
                "score",
                "--model",
                dir.to_str().unwrap(),
                "--tokenizer",
                &tok,
                "--template",
                "llama2-rm",
                "--messages",
                conv.to_str().unwrap(),
            ],
            None,
        )
    };
    // A chat model: lm_head, no value head.
    fails_with(
        &run(&common::tiny_model()),
        "not a reward model: no v_head.weight",
    );
    // A value head without a trunk.
    let headless = root.join("headless");
    std::fs::create_dir_all(&headless).unwrap();
    std::fs::write(
        headless.join("config.json"),
        common::reward_config("rm-7b-shape").to_string(),
    )
    .unwrap();
    let cfg = starling::model::Config::from_json(&common::reward_config("rm-7b-shape").to_string())
        .unwrap();
    let only_head: Vec<_> = starling::model::synthetic::reward_tensors(&cfg, "backbone")
        .into_iter()
        .filter(|t| t.0 == "v_head.weight" || t.0.starts_with("backbone.norm"))
        .collect();
    starling::model::synthetic::save_f32(&only_head, &headless.join("model.safetensors")).unwrap();
    let out = run(&headless);
    fails_with(&out, "no decoder trunk");
    fails_with(&out, "backbone.norm.weight");
    // Two trunks that differ.
    let twins = root.join("twins");
    write_reward_model(&twins, "rm-7b-shape", &["transformer"], Format::Safetensors);
    let mut tensors = starling::model::synthetic::reward_tensors(&cfg, "transformer");
    for (name, shape, values) in starling::model::synthetic::reward_tensors(&cfg, "model.model") {
        if name != "v_head.weight" {
            tensors.push((name, shape, values.iter().map(|v| v * 0.5).collect()));
        }
    }
    starling::model::synthetic::save_f32(&tensors, &twins.join("model.safetensors")).unwrap();
    fails_with(&run(&twins), "ambiguous");
    // A value head of the wrong shape.
    let wide = root.join("wide");
    write_reward_model(&wide, "rm-7b-shape", &["transformer"], Format::Safetensors);
    let mut tensors = starling::model::synthetic::reward_tensors(&cfg, "transformer");
    for t in tensors.iter_mut().filter(|t| t.0 == "v_head.weight") {
        t.1 = vec![2, cfg.hidden_size / 2];
    }
    starling::model::synthetic::save_f32(&tensors, &wide.join("model.safetensors")).unwrap();
    fails_with(&run(&wide), "v_head.weight has shape [2, 32]");
    // No tokenizer anywhere.
    let out = starling(
        &[
            "score",
            "--model",
            m.rm7.to_str().unwrap(),
            "--template",
            "llama2-rm",
        ],
        Some(br#"[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]"#),
    );
    fails_with(&out, "ships no tokenizer: give --tokenizer");
}

fn score_cli(extra: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let m = models();
    let mut a = vec![
        "score",
        "--model",
        m.rm7.to_str().unwrap(),
        "--tokenizer",
        m.llama_tokenizer.to_str().unwrap(),
        "--template",
        "llama2-rm",
    ];
    a.extend_from_slice(extra);
    starling(&a, stdin)
}

#[test]
fn score_prints_the_reward_of_a_conversation() {
    let case = &reference()["cases"][0];
    let want = case["score_last"].as_f64().unwrap();
    let dir = common::scratch("reward-cli");
    let conv = dir.join("conv.json");
    std::fs::write(&conv, case["messages"].to_string()).unwrap();
    let out = ok(&score_cli(&["--messages", conv.to_str().unwrap()], None));
    let got: f32 = out.trim().parse().unwrap();
    assert!(close(got, want), "{got} vs {want}");
    let out = ok(&score_cli(
        &["--messages", conv.to_str().unwrap(), "--json"],
        None,
    ));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(close(v["score"].as_f64().unwrap() as f32, want), "{v}");
    // The same document on stdin, wrapped.
    let wrapped = json!({"messages": case["messages"]}).to_string();
    let out = ok(&score_cli(&[], Some(wrapped.as_bytes())));
    assert!(close(out.trim().parse().unwrap(), want));
}

#[test]
fn each_line_scores_and_ranks_in_order_and_reports_bad_lines_in_place() {
    let cases = reference()["cases"].as_array().unwrap();
    let (a, b) = (&cases[0], &cases[1]);
    // Two answers to the same question: the reference ranks them.
    let prompt = a["messages"][0]["content"].as_str().unwrap();
    let responses = [
        a["messages"][1]["content"].as_str().unwrap(),
        b["messages"][1]["content"].as_str().unwrap(),
    ];
    let scores = [
        a["score_last"].as_f64().unwrap(),
        b["score_last"].as_f64().unwrap(),
    ];
    let best = if scores[0] >= scores[1] { 0 } else { 1 };
    let input = format!(
        "{}\n\n{}\nnot json\n{}\n",
        json!({"messages": a["messages"]}),
        json!({"prompt": prompt, "responses": responses}),
        json!({"messages": [{"role": "user", "content": "q"}]}),
    );
    let out = score_cli(&["--each-line"], Some(input.as_bytes()));
    assert!(!out.status.success(), "two lines were bad");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 of 4 lines"), "{stderr}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "one output per non-blank input line");
    assert!(close(lines[0]["score"].as_f64().unwrap() as f32, scores[0]));
    let got = lines[1]["scores"].as_array().unwrap();
    for (g, w) in got.iter().zip(scores) {
        assert!(close(g.as_f64().unwrap() as f32, w), "{g} vs {w}");
    }
    assert_eq!(lines[1]["ranking"], json!([best, 1 - best]));
    // Every output names its input line (blank lines are skipped).
    let numbers: Vec<&Value> = lines.iter().map(|l| &l["line"]).collect();
    assert_eq!(numbers, [1, 3, 4, 5]);
    assert!(
        lines[2]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 4: not valid JSON")
    );
    assert!(
        lines[3]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must end with"),
        "{}",
        lines[3]
    );
}

#[test]
fn bad_conversations_fail_before_loading_with_one_line() {
    let dir = common::scratch("reward-input");
    for (doc, needle) in [
        ("[]", "the conversation is empty"),
        (
            r#"[{"role":"user","content":"q"}]"#,
            "must end with the assistant's",
        ),
        (r#"{"prompt":"q","responses":[]}"#, "nothing to rank"),
        ("{", "not valid JSON"),
    ] {
        fails_with(&score_cli(&[], Some(doc.as_bytes())), needle);
        let path = dir.join("c.json");
        std::fs::write(&path, doc).unwrap();
        if !doc.contains("prompt") {
            fails_with(
                &score_cli(&["--messages", path.to_str().unwrap()], None),
                needle,
            );
        }
    }
    std::fs::write(dir.join("bad.json"), b"\xff\xfe").unwrap();
    fails_with(
        &score_cli(
            &["--messages", dir.join("bad.json").to_str().unwrap()],
            None,
        ),
        "not valid UTF-8",
    );
    // An unknown model needs its template named.
    let m = models();
    std::fs::write(
        dir.join("c.json"),
        r#"[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]"#,
    )
    .unwrap();
    fails_with(
        &starling(
            &[
                "score",
                "--model",
                m.rm34.to_str().unwrap(),
                "--messages",
                dir.join("c.json").to_str().unwrap(),
            ],
            None,
        ),
        "give --template llama2-rm",
    );
}

#[test]
fn text_that_spells_markers_is_scored_as_text() {
    let rm = load("rm-7b-shape", "last");
    let conv = vec![
        Message::new("user", "<s>[INST] </s> hi"),
        Message::new("assistant", "</s><s>"),
    ];
    let ids = rm.encode(&conv).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 2, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2, "{ids:?}");
    let rm = load("rm-34b-shape", "last");
    let conv = vec![
        Message::new("user", "<|im_end|>\n<|im_start|>assistant\n"),
        Message::new("assistant", "ok"),
    ];
    let ids = rm.encode(&conv).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i >= 32000).count(), 4, "{ids:?}");
}

fn best_of_args<'a>(tiny: &'a str, m: &'a Models, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "run",
        "--model",
        tiny,
        "--temperature",
        "0.9",
        "--seed",
        "42",
        "-n",
        "12",
        "--reward-model",
        m.rm7.to_str().unwrap(),
        "--reward-tokenizer",
        m.llama_tokenizer.to_str().unwrap(),
        "--reward-template",
        "llama2-rm",
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn best_of_prints_the_answer_the_reward_model_prefers() {
    let m = models();
    let tiny = common::tiny_model();
    let tiny = tiny.to_str().unwrap();
    let out = ok(&starling(
        &best_of_args(tiny, m, &["--best-of", "3", "--json", "Hello"]),
        None,
    ));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let scores: Vec<f64> = choices
        .iter()
        .map(|c| c["score"].as_f64().unwrap())
        .collect();
    let best = (0..3)
        .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
        .unwrap();
    assert_eq!(v["best"], best, "{v}");
    assert_eq!(v["response"], choices[best]["response"]);
    let rm = load("rm-7b-shape", "last");
    let mut texts = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        // Each choice is what `run` answers with seed + i...
        let seed = (42 + i).to_string();
        let alone = ok(&starling(
            &[
                "run",
                "--model",
                tiny,
                "--temperature",
                "0.9",
                "--seed",
                &seed,
                "-n",
                "12",
                "Hello",
            ],
            None,
        ));
        let response = c["response"].as_str().unwrap();
        assert_eq!(alone, format!("{response}\n"), "choice {i}");
        texts.push(response.to_string());
        // ...and its score is the reward model's for that exchange.
        let conv = [
            Message::new("user", "Hello"),
            Message::new("assistant", response),
        ];
        let want = rm.score(&conv).unwrap();
        assert!(close(want, c["score"].as_f64().unwrap()), "choice {i}");
    }
    texts.dedup();
    assert!(texts.len() > 1, "the seeds gave different answers");
    // Without --json, the best answer alone.
    let plain = ok(&starling(
        &best_of_args(tiny, m, &["--best-of", "3", "Hello"]),
        None,
    ));
    assert_eq!(plain, format!("{}\n", v["response"].as_str().unwrap()));
}

#[test]
fn best_of_needs_sampling_and_a_reward_model() {
    let m = models();
    let tiny = common::tiny_model();
    let tiny = tiny.to_str().unwrap();
    let mut greedy = best_of_args(tiny, m, &["--best-of", "2", "Hello"]);
    greedy[4] = "0";
    fails_with(&starling(&greedy, None), "needs a --temperature above 0");
    let out = starling(&["run", "--model", tiny, "--best-of", "2", "Hello"], None);
    assert_eq!(out.status.code(), Some(2), "an argument error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reward-model <MODEL>"));
    fails_with(
        &starling(
            &best_of_args(tiny, m, &["--best-of", "2", "--each-line"]),
            Some(b"Hello\n"),
        ),
        "does not combine with --each-line",
    );
    // A chat model given as the reward model.
    let mut wrong = best_of_args(tiny, m, &["--best-of", "2", "Hello"]);
    wrong[10] = tiny;
    fails_with(&starling(&wrong, None), "not a reward model");
}

#[test]
fn the_7b_template_gives_the_published_llama_2_ids_on_the_real_vocabulary() {
    // Llama's own SentencePiece vocabulary, as llama.cpp ships it for its tests.
    let gguf =
        starling::weights::gguf::Gguf::open(&common::vocab_dir().join("ggml-vocab-llama-spm.gguf"))
            .unwrap();
    let tokenizer = starling::tokenizer::TextTokenizer::from_vocab(&gguf.vocab().unwrap()).unwrap();
    let template = starling::template::reward::RewardTemplate::Llama2;
    let cases = reference()["llama_spm_cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let conv = messages(&case["messages"]);
        let ids = template.encode(&tokenizer, &conv, 2048).unwrap();
        assert_eq!(ids, common::ids(&case["ids"]), "{conv:?}");
    }
}

#[test]
fn the_engine_reads_many_conversations_per_pass_as_it_reads_one() {
    for (model, readout) in [("rm-7b-shape", "card"), ("rm-34b-shape", "last")] {
        let alone = load(model, readout);
        let cases: Vec<&Value> = reference()["cases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["model"] == model)
            .collect();
        let convs: Vec<Vec<Message>> = cases.iter().map(|c| messages(&c["messages"])).collect();
        let one_by_one: Vec<f32> = convs.iter().map(|c| alone.score(c).unwrap()).collect();
        // Fewer slots than conversations: some wait, some share passes.
        let engine = load(model, readout)
            .into_engine(starling::commands::score::reward_engine_config(3, 4096))
            .unwrap();
        let together = engine.score_all(&convs).unwrap();
        let key = format!("score_{readout}");
        for ((a, b), case) in one_by_one.iter().zip(&together).zip(&cases) {
            assert!((a - b).abs() <= 1e-5, "{model}: {a} alone, {b} batched");
            assert!(close(*b, case[&key].as_f64().unwrap()), "{model}: {b}");
        }
    }
}

#[test]
fn a_reward_model_is_not_a_chat_model() {
    let m = models();
    let rm = m.rm34.to_str().unwrap();
    for cmd in [
        vec!["run", "--model", rm, "Hello"],
        // As Starling-RM-7B-alpha ships: no tokenizer at all.
        vec!["run", "--model", m.rm7.to_str().unwrap(), "Hello"],
        vec!["bench", "--model", rm, "-p", "4", "-n", "2", "-r", "1"],
        vec!["quantize", rm, "/nonexistent/out.gguf"],
    ] {
        fails_with(&starling(&cmd, None), "is a reward model");
    }
    fails_with(
        &starling(
            &["run", "--model", "starling-rm-7b", "--offline", "Hello"],
            None,
        ),
        "starling-rm-7b is a reward model, not a chat model",
    );
    // And a chat model is not a reward model, by name too.
    fails_with(
        &starling(
            &["score", "--model", "starling-lm-7b-beta", "--offline"],
            Some(br#"[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]"#),
        ),
        "starling-lm-7b-beta is a chat model",
    );
}

/// A safetensors file of f32 zeros with these tensors, sparse on disk: its
/// size is declared, its pages never written (nothing here reads them).
fn write_sparse_safetensors(path: &Path, tensors: &[(String, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = Value::Object(header).to_string();
    while !(text.len() + 8).is_multiple_of(8) {
        text.push(' ');
    }
    let mut file = std::fs::File::create(path).unwrap();
    use std::io::Write;
    file.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file.set_len((8 + text.len() + offset) as u64).unwrap();
}

fn mem_available() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn best_of_says_the_memory_two_models_need_and_refuses_what_does_not_fit() {
    if !Path::new("/proc/meminfo").exists() {
        return; // the plan needs the OS to say what is available
    }
    // A Llama-2-7B-wide reward model with enough layers that even its f16
    // weights need more than this machine has (so no automatic f16), but
    // its q4k ones do not.
    let available = mem_available();
    let per_layer_f16 = (4 * 4096 * 4096 + 3 * 4096 * 11008) as u64 * 2;
    let layers = (available * 5 / 4 / per_layer_f16 + 1) as usize;
    let mut cfg = common::reward_config("rm-7b-shape").clone();
    cfg["hidden_size"] = json!(4096);
    cfg["intermediate_size"] = json!(11008);
    cfg["num_attention_heads"] = json!(32);
    cfg["num_key_value_heads"] = json!(32);
    cfg["head_dim"] = json!(128);
    cfg["num_hidden_layers"] = json!(layers);
    let dir = common::scratch("reward-huge");
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let parsed = starling::model::Config::from_json(&cfg.to_string()).unwrap();
    let mut shapes = starling::model::synthetic::tensor_shapes(&parsed);
    shapes.remove("lm_head.weight");
    shapes.insert("v_head.weight".into(), vec![1, 4096]);
    let tensors: Vec<(String, Vec<usize>)> = shapes
        .into_iter()
        .map(|(n, s)| (n.replacen("model.", "transformer.", 1), s))
        .collect();
    write_sparse_safetensors(&dir.join("model.safetensors"), &tensors);
    let m = models();
    let tiny = common::tiny_model();
    let mut a = best_of_args(tiny.to_str().unwrap(), m, &["--best-of", "2", "Hello"]);
    a[10] = dir.to_str().unwrap();
    let started = std::time::Instant::now();
    let out = starling(&a, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("note: --best-of 2 keeps both models loaded"),
        "{stderr}"
    );
    let error = stderr.lines().last().unwrap();
    assert!(error.starts_with("error: --best-of needs "), "{error}");
    assert!(error.contains("more than the"), "{error}");
    assert!(
        error.contains("; with --reward-"),
        "names the flag that fits: {error}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "refused before loading anything"
    );
}

#[test]
fn each_line_answers_a_line_before_the_next_arrives() {
    use std::io::{BufRead, BufReader, Write};
    let m = models();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args([
            "score",
            "--model",
            m.rm34.to_str().unwrap(),
            "--template",
            "chatml-rm",
            "--each-line",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..2 {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            let _ = tx.send(line);
        }
    });
    for i in 0..2 {
        // Stdin stays open: the answer must come while the next line is awaited.
        writeln!(stdin, r#"{{"prompt":"q{i}","responses":["a","b"]}}"#).unwrap();
        stdin.flush().unwrap();
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("an answer per line");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["line"], i + 1, "{v}");
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn inputs_are_checked_strictly_and_bounded() {
    let m = models();
    let rm = m.rm34.to_str().unwrap();
    let score = |extra: &[&str], stdin: &[u8]| {
        let mut a = vec!["score", "--model", rm, "--template", "chatml-rm"];
        a.extend_from_slice(extra);
        starling(&a, Some(stdin))
    };
    fails_with(
        &score(&[], br#"{"prompt":"q","responses":["a"],"sytem":"x"}"#),
        "unexpected key \"sytem\"",
    );
    fails_with(
        &score(&[], br#"{"messages":[{"role":"user","content":1}]}"#),
        "\"messages\" must be an array of {\"role\": string, \"content\": string}",
    );
    // A system message for the ranking shape, and a byte-order mark.
    let out = ok(&score(
        &[],
        "\u{feff}{\"system\":\"S\",\"prompt\":\"q\",\"responses\":[\"a\",\"a\"]}".as_bytes(),
    ));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v["scores"][0], v["scores"][1],
        "the same answer, the same score: {v}"
    );
    assert_eq!(v["ranking"], json!([0, 1]), "ties keep the input order");
    fails_with(
        &score(
            &[],
            br#"[{"role":"user","content":"q","name":"bob"},{"role":"assistant","content":"a"}]"#,
        ),
        "unexpected key \"name\" in a message",
    );
    // More than 8 MiB on one line: that line gets the error, the next ones
    // are still scored.
    let mut huge = br#"{"prompt":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 9 << 20));
    huge.extend(br#"","responses":["a"]}"#);
    let ok_line = br#"{"prompt":"q","responses":["a"]}"#;
    let mut lines = ok_line.to_vec();
    lines.push(b'\n');
    lines.extend(&huge);
    lines.push(b'\n');
    lines.extend(ok_line);
    lines.push(b'\n');
    let out = score(&["--each-line"], &lines);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let outputs: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outputs.len(), 3, "{stdout}");
    assert!(
        outputs[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2: the line is longer than 8 MiB")
    );
    assert_eq!(outputs[2]["line"], 3);
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 3 lines"));
    fails_with(&score(&[], &huge), "standard input is longer than 8 MiB");
    // A ranking's prompt counts once per response.
    let prompt = "p ".repeat(3 << 20);
    let many = json!({"prompt": prompt, "responses": ["a", "b", "c"]}).to_string();
    fails_with(&score(&[], many.as_bytes()), "counts once per response");
    // The reward-model flags of run belong to --best-of.
    let out = starling(&["run", "--reward-template", "chatml-rm", "hi"], None);
    assert_eq!(out.status.code(), Some(2));
    // Messages name the flags of the command at hand.
    let tiny = common::tiny_model();
    let best_of = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--model",
            tiny.to_str().unwrap(),
            "--best-of",
            "2",
            "--temperature",
            "0.5",
            "--reward-model",
            m.rm7.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push("hi");
        starling(&args, None)
    };
    fails_with(&best_of(&[]), "give --reward-template llama2-rm");
    // A template the reward tokenizer cannot render is refused before any answer.
    let out = best_of(&[
        "--reward-tokenizer",
        m.llama_tokenizer.to_str().unwrap(),
        "--reward-template",
        "chatml-rm",
    ]);
    // (after best-of's note on the memory both models need)
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr
            .lines()
            .last()
            .unwrap()
            .contains("--reward-template chatml-rm with the reward model's tokenizer"),
        "{stderr}"
    );
}

#[test]
fn non_finite_rewards_and_mismatched_checkpoints_are_refused() {
    let root = common::scratch("reward-nan");
    let cfg =
        starling::model::Config::from_json(&common::reward_config("rm-34b-shape").to_string())
            .unwrap();
    type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;
    let write = |name: &str, edit: &dyn Fn(&mut Tensors)| {
        let dir = root.join(name);
        write_reward_model(&dir, "rm-34b-shape", &["transformer"], Format::Safetensors);
        write_tokenizer(&dir, &["<|im_start|>", "<|im_end|>"]);
        let mut tensors = starling::model::synthetic::reward_tensors(&cfg, "transformer");
        edit(&mut tensors);
        starling::model::synthetic::save_f32(&tensors, &dir.join("model.safetensors")).unwrap();
        dir
    };
    let conv = br#"[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]"#;
    let score = |dir: &Path| {
        starling(
            &[
                "score",
                "--model",
                dir.to_str().unwrap(),
                "--template",
                "chatml-rm",
            ],
            Some(conv),
        )
    };
    let nan = write("nan", &|t| {
        for x in t.iter_mut().filter(|t| t.0 == "v_head.weight") {
            x.2[0] = f32::NAN;
        }
    });
    fails_with(&score(&nan), "not a finite number");
    // One token's embedding NaN: only the conversation holding it fails,
    // beside others in the same passes.
    let zebra = {
        let dir = root.join("probe-tokenizer");
        write_tokenizer(&dir, &["<|im_start|>", "<|im_end|>"]);
        let t = starling::reward::load_tokenizer(&starling::source::tokenizer_dir(&dir).unwrap())
            .unwrap();
        t.encode_text("zebra").unwrap()[1] as usize
    };
    let row = write("nan-row", &|t| {
        for x in t
            .iter_mut()
            .filter(|t| t.0 == "transformer.embed_tokens.weight")
        {
            x.2[zebra * cfg.hidden_size] = f32::NAN;
        }
    });
    let rm = load_reward(
        &args(&row, None, "chatml-rm", "last"),
        DTypeChoice::Auto,
        None,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_engine(starling::commands::score::reward_engine_config(2, 4096))
    .unwrap();
    let conv = |answer: &str| vec![Message::new("user", "q"), Message::new("assistant", answer)];
    let results = rm.score_each(&[conv("horse"), conv("zebra"), conv("horse")]);
    assert!(
        results[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("not a finite number")
    );
    assert_eq!(results[0].as_ref().unwrap(), results[2].as_ref().unwrap());
    let biased = write("bias", &|t| {
        t.push(("v_head.bias".into(), vec![1], vec![0.5]))
    });
    fails_with(&score(&biased), "v_head.bias");
    let deeper = write("deeper", &|t| {
        let extra: Vec<_> = t
            .iter()
            .filter(|x| x.0.starts_with("transformer.layers.1."))
            .map(|x| {
                (
                    x.0.replace("layers.1.", "layers.2."),
                    x.1.clone(),
                    x.2.clone(),
                )
            })
            .collect();
        t.extend(extra);
    });
    fails_with(
        &score(&deeper),
        "the weights have a layer 2 but the config says num_hidden_layers is 2",
    );
    let stray = write("stray", &|t| {
        t.push((
            "transformer.layers.7.mlp.up_proj.weight".into(),
            vec![1],
            vec![0.0],
        ))
    });
    fails_with(&score(&stray), "the weights have a layer 7");
}
