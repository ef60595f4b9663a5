//! The Llama 3 and Qwen2 families on tiny models (tests/family-weights.md):
//! RoPE scaling (llama3, linear, dynamic), tied embeddings, GQA, q/k/v
//! biases, against transformers' own logits and generate() ids
//! (scripts/reference-families.py made tests/data/family-reference.json).

mod common;

use serde_json::Value;
use starling::model::{Config, Logits, Model};
use starling::weights::Weights;

fn reference() -> Value {
    let text =
        std::fs::read_to_string(common::root().join("tests/data/family-reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(name: &str, config: &Value) -> Model {
    let dir = common::scratch(name);
    let text = config.to_string();
    std::fs::write(dir.join("config.json"), &text).unwrap();
    let config = Config::from_json(&text).unwrap();
    starling::model::synthetic::write_safetensors(&config, &dir).unwrap();
    let weights = Weights::open(&[dir.join("model.safetensors")]).unwrap();
    Model::load(
        &config,
        &weights,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn logits_and_greedy_ids_match_transformers() {
    let r = reference();
    let models = r["models"].as_object().unwrap();
    assert_eq!(models.len(), 4);
    for (name, m) in models {
        let model = load(name, &m["config"]);
        for case in m["cases"].as_array().unwrap() {
            let prompt = common::ids(&case["prompt"]);
            // Full forward: every position's logits.
            let mut cache = model.new_cache();
            let all = model.forward(&prompt, &mut cache, Logits::All).unwrap();
            let all: Vec<Vec<f32>> = all.to_vec2().unwrap();
            let mut worst = 0f64;
            for (p, want) in case["positions"]
                .as_array()
                .unwrap()
                .iter()
                .zip(case["logits"].as_array().unwrap())
            {
                let got = &all[p.as_u64().unwrap() as usize];
                for (g, w) in got.iter().zip(want.as_array().unwrap()) {
                    worst = worst.max((*g as f64 - w.as_f64().unwrap()).abs());
                }
            }
            eprintln!(
                "{name}, {} tokens: worst logit difference {worst:.2e}",
                prompt.len()
            );
            assert!(
                worst <= 1e-4,
                "{name}, {} tokens: logits differ by {worst}",
                prompt.len()
            );
            // The cached loop: one token at a time after the prompt.
            let mut cache = model.new_cache();
            let mut last: Vec<f32> = model
                .forward(&prompt, &mut cache, Logits::Last)
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut ids = Vec::new();
            for _ in 0..case["greedy"].as_array().unwrap().len() {
                let id = argmax(&last);
                ids.push(id);
                last = model
                    .forward_token(id, &mut cache)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
            }
            assert_eq!(
                ids,
                common::ids(&case["greedy"]),
                "{name}, {} tokens",
                prompt.len()
            );
        }
    }
}

/// Dynamic scaling's frequencies depend on the sequence's length at each
/// pass, so the engine must treat a prompt cut into chunks as one pass, and
/// must not reuse keys rotated for another length.
#[test]
fn dynamic_rope_scaling_answers_as_transformers_through_the_engine_and_reused_caches() {
    use starling::engine::{Engine, EngineConfig, Session};
    let r = reference();
    let m = &r["models"]["tiny-llama-dynamic"];
    let cases = m["cases"].as_array().unwrap();
    // Prompts of 12, 81 and 60 tokens (the original context is 64) read in
    // chunks of 16 rows, two sequences at a time, one slot reused by the third.
    let config = EngineConfig {
        parallel: 2,
        batch_tokens: 16,
        context: None,
    };
    let engine = Engine::start(load("dynamic-engine", &m["config"]), None, config).unwrap();
    let handles: Vec<_> = cases
        .iter()
        .map(|c| {
            let n = c["greedy"].as_array().unwrap().len();
            engine
                .submit(common::greedy_request(n, common::ids(&c["prompt"])))
                .unwrap()
        })
        .collect();
    for (c, h) in cases.iter().zip(handles) {
        let outcome = h.wait(&mut |_| Ok(()), None).unwrap();
        assert_eq!(
            outcome.ids,
            common::ids(&c["greedy"]),
            "engine, {}",
            c["prompt"]
        );
    }

    // A session that read the 81-token prompt holds keys rotated for 81
    // positions: the 60-token prefix of it must be read afresh, and so must
    // the prompt after a turn past the original context.
    let model = load("dynamic-session", &m["config"]);
    let fresh = |prompt: &[u32]| -> Vec<f32> {
        model
            .forward(prompt, &mut model.new_cache(), Logits::Last)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let long = common::ids(&cases[1]["prompt"]);
    let mut session = Session::new(load("dynamic-session", &m["config"]));
    session.prefill(&long).unwrap();
    for prompt in [&long[..60], &long[..70], &long[..]] {
        let (logits, prefill) = session.prefill(prompt).unwrap();
        let logits: Vec<f32> = logits.to_vec1().unwrap();
        assert!(
            logits == fresh(prompt),
            "{} tokens: not a fresh run's logits",
            prompt.len()
        );
        assert_eq!(prefill.cached, 0, "{} tokens", prompt.len());
    }
    // Under the original context, keys written at default frequencies are reused.
    let short = &long[..40];
    session.prefill(short).unwrap();
    let (logits, prefill) = session.prefill(&long[..50]).unwrap();
    assert_eq!(prefill.cached, 40);
    let logits: Vec<f32> = logits.to_vec1().unwrap();
    assert!(
        logits == fresh(&long[..50]),
        "50 tokens: not a fresh run's logits"
    );
}

#[test]
fn unsupported_rope_scaling_and_windows_are_refused_by_name() {
    let base = reference()["models"]["tiny-llama3"]["config"].clone();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = base.clone();
        edit(&mut c);
        Config::from_json(&c.to_string())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let err =
        with(&|c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    assert!(
        err.contains("\"yarn\" is not supported (default, linear, dynamic, llama3)"),
        "{err}"
    );
    let err = with(&|c| c["rope_scaling"]["factor"] = serde_json::json!(-1.0));
    assert!(
        err.contains("factor is -1: expected a number from 1e-6 to 1e6"),
        "{err}"
    );
    let err = with(&|c| c["rope_scaling"]["factor"] = serde_json::json!(1e308));
    assert!(err.contains("factor is 1e308: expected"), "{err}");
    // Positive, but 0 once in f32.
    let err = with(&|c| c["rope_scaling"]["factor"] = serde_json::json!(1e-320));
    assert!(err.contains("factor is 1e-320: expected"), "{err}");
    let err = with(&|c| c["rope_scaling"] = serde_json::json!({"type": "dynamic", "factor": 0.5}));
    assert!(
        err.contains("needs a factor of at least 1, not 0.5"),
        "{err}"
    );
    let err = with(&|c| {
        c["rope_scaling"] = serde_json::json!({"type": "dynamic", "factor": 1e5});
        c["max_position_embeddings"] = serde_json::json!(131072);
    });
    assert!(err.contains("more than starling supports"), "{err}");
    let err = with(&|c| c["rope_scaling"]["high_freq_factor"] = serde_json::json!(0.5));
    assert!(err.contains("must be above low_freq_factor"), "{err}");
    let err = with(&|c| {
        c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        c["model_type"] = serde_json::json!("qwen2");
        c["use_sliding_window"] = serde_json::json!(true);
    });
    assert!(err.contains("use_sliding_window"), "{err}");
}

/// A model directory as the hub publishes the family: config.json (tied,
/// with the family's rope and biases), deterministic weights, the real
/// vocabulary as tokenizer.json (from llama.cpp's vocabulary file), the
/// real chat template, and generation_config.json's end ids.
fn write_family_dir(
    name: &str,
    config: &Value,
    vocab: &str,
    template: &str,
    special: (&str, &str),
    eos: &[u32],
) -> std::path::PathBuf {
    let dir = common::scratch(name);
    let vocab = starling::weights::gguf::read_vocab(
        &common::vocab_dir().join(format!("ggml-vocab-{vocab}.gguf")),
    )
    .unwrap();
    let tokenizer = starling::tokenizer::TextTokenizer::from_gguf_vocab(&vocab).unwrap();
    tokenizer
        .inner()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let mut config = config.clone();
    config["vocab_size"] = vocab.len().into();
    config["eos_token_id"] = serde_json::json!(eos);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let parsed = Config::from_json(&config.to_string()).unwrap();
    starling::model::synthetic::write_safetensors(&parsed, &dir).unwrap();
    let source = std::fs::read_to_string(common::templates_dir().join(template)).unwrap();
    let tok_config = serde_json::json!({
        "bos_token": special.0, "eos_token": special.1, "chat_template": source,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::json!({"eos_token_id": eos}).to_string(),
    )
    .unwrap();
    dir
}

fn tokenize(model: &std::path::Path, conv: &Value) -> Vec<u32> {
    let dir = if model.is_dir() {
        model
    } else {
        model.parent().unwrap()
    };
    let path = dir.join("conv.json");
    std::fs::write(&path, conv.to_string()).unwrap();
    let out = common::ok(&common::starling(
        &[
            "tokenize",
            "--model",
            dir.to_str().unwrap(),
            "--messages",
            path.to_str().unwrap(),
        ],
        None,
    ));
    common::ids(&serde_json::from_str(&out).unwrap())
}

/// `starling run` on a directory as the family publishes it: the prompt is
/// the real template over the real vocabulary (user text that spells a
/// special token stays text), and the greedy answer is what the decoder
/// gives for those ids, ending at the family's end-of-turn id.
fn check_family_end_to_end(dir: &std::path::Path, eot: u32, markers: &[&str]) {
    let conv = serde_json::json!([{"role": "user", "content": "Hello <|eot_id|><|im_end|>"}]);
    let ids = tokenize(dir, &conv);
    let files = starling::source::local_dir(dir).unwrap();
    let text = starling::loader::load_text(&files, "auto").unwrap();
    assert!(text.stop_ids.contains(&eot), "{:?}", text.stop_ids);
    let rendered = text.tokenizer.inner().decode(&ids, false).unwrap();
    for m in markers {
        assert!(rendered.contains(m), "{m:?} in {rendered:?}");
    }
    // The typed markers are text: each special id appears only where the template puts it.
    // Two turns end: the template's system block and the user's.
    let eot_count = ids.iter().filter(|&&i| i == eot).count();
    assert_eq!(eot_count, 2, "end-of-turn ids in {ids:?}");
    // The answer: starling run against the decoder's own greedy loop.
    let config = Config::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&[dir.join("model.safetensors")]).unwrap();
    let model = Model::load(
        &config,
        &weights,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut cache = model.new_cache();
    let mut last: Vec<f32> = model
        .forward(&ids, &mut cache, Logits::Last)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut answer = Vec::new();
    for _ in 0..6 {
        let id = argmax(&last);
        if text.stop_ids.contains(&id) {
            break;
        }
        answer.push(id);
        last = model
            .forward_token(id, &mut cache)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
    let want = text.tokenizer.decode(&answer).unwrap();
    let path = dir.join("conv.json");
    let out = common::ok(&common::starling(
        &[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "6",
            "--messages",
            path.to_str().unwrap(),
        ],
        None,
    ));
    // Byte-level BPE decodes a leading space as one (no word-start marker
    // to drop, unlike SentencePiece): the answer is exactly its decode.
    assert_eq!(out.strip_suffix('\n').unwrap(), want);
}

#[test]
fn a_llama_3_1_directory_runs_with_its_own_vocabulary_and_template() {
    let mut config = reference()["models"]["tiny-llama3"]["config"].clone();
    config["bos_token_id"] = 128000.into();
    let dir = llama_3_1_dir("llama3-dir", &config);
    check_family_end_to_end(
        &dir,
        128009,
        &[
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>",
            "<|start_header_id|>user<|end_header_id|>\n\nHello <|eot_id|><|im_end|><|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ],
    );
}

#[test]
fn a_llama_3_directory_quantized_to_gguf_keeps_its_vocabulary_and_answers() {
    let mut config = reference()["models"]["tiny-llama3"]["config"].clone();
    config["bos_token_id"] = 128000.into();
    let dir = llama_3_1_dir("llama3-quantize", &config);
    let gguf = dir.join("llama3.gguf");
    common::ok(&quantize_f32(&dir, &gguf));
    // The byte-level vocabulary as llama.cpp's converter writes it.
    let vocab = starling::weights::gguf::read_vocab(&gguf).unwrap();
    let starling::tokenizer::Vocab::Bpe(bpe) = &vocab else {
        panic!("a SentencePiece vocabulary was written");
    };
    assert_eq!(bpe.pre_name, "llama-bpe");
    assert_eq!(bpe.tokens.len(), 128256);
    let from_gguf = starling::tokenizer::TextTokenizer::from_gguf_vocab(&vocab).unwrap();
    let files = starling::source::local_dir(&dir).unwrap();
    let from_dir = starling::loader::load_text(&files, "auto")
        .unwrap()
        .tokenizer;
    for text in [
        "Hello world",
        "  ümlauts, 中文 and 🦀 1234567",
        "<|eot_id|> stays text",
    ] {
        assert_eq!(
            from_gguf.encode_text(text).unwrap(),
            from_dir.encode_text(text).unwrap(),
            "{text:?}"
        );
    }
    // The same prompt and the same greedy answer from the GGUF as from the directory.
    let conv = serde_json::json!([{"role": "user", "content": "Hello"}]);
    assert_eq!(tokenize(&gguf, &conv), tokenize(&dir, &conv));
    let answer = |model: &std::path::Path| {
        common::ok(&common::starling(
            &[
                "run",
                "--model",
                model.to_str().unwrap(),
                "--temperature",
                "0",
                "-n",
                "6",
                "Hello",
            ],
            None,
        ))
    };
    assert_eq!(answer(&gguf), answer(&dir));
    // Every id that ends a directory's answer ends the GGUF's too
    // (<|end_of_text|>, <|eom_id|>, <|eot_id|>), not only its one EOS id.
    let stops = |m: &std::path::Path| -> Vec<u32> {
        let text = match m.extension() {
            Some(_) => {
                let file = starling::weights::gguf::Gguf::open(m).unwrap();
                starling::loader::text_from_gguf(&file, "auto").unwrap()
            }
            None => starling::loader::load_text(&starling::source::local_dir(m).unwrap(), "auto")
                .unwrap(),
        };
        text.stop_ids
    };
    assert_eq!(stops(&dir), [128001, 128008, 128009]);
    // 128008 is <|reserved_special_token_3|> in this (3.0) vocabulary: a
    // GGUF holds one EOS id, and 3.1's <|eom_id|> would be found by its text.
    assert_eq!(stops(&gguf), [128001, 128009]);
    // Quantizing the GGUF again keeps its rope frequency divisors (Llama 3.1's scaling).
    let again = dir.join("again.gguf");
    common::ok(&quantize_f32(&gguf, &again));
    let file = starling::weights::gguf::Gguf::open(&again).unwrap();
    assert!(
        file.config().rope_freq_factors.is_some(),
        "rope_freqs.weight was dropped"
    );
    let worst = worst_gguf_against_dir(&again, &dir, 100, 128256);
    assert!(worst <= 1e-4, "the GGUF quantized again differs by {worst}");
    assert_eq!(stops(&again), stops(&gguf));
}

#[test]
fn a_qwen2_5_directory_runs_with_its_own_vocabulary_and_template() {
    let mut config = reference()["models"]["tiny-qwen2"]["config"].clone();
    config["bos_token_id"] = Value::Null;
    let dir = write_family_dir(
        "qwen2-dir",
        &config,
        "qwen2",
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        ("", "<|im_end|>"),
        &[151645, 151643],
    );
    check_family_end_to_end(
        &dir,
        151645,
        &[
            "<|im_start|>system\nYou are Qwen",
            "<|im_start|>user\nHello <|eot_id|><|im_end|><|im_end|>\n<|im_start|>assistant\n",
        ],
    );
}

#[test]
fn a_gguf_carries_llama_3_1_scaling_as_llama_cpp_does() {
    // The tiny Llama 3 over the Mistral SentencePiece vocabulary (so that
    // `quantize` can write its vocabulary), as a directory and as the GGUF
    // that `starling quantize` writes: rope scaling becomes llama.cpp's
    // rope_freqs.weight, and the two give the same logits.
    let mut config = reference()["models"]["tiny-llama3"]["config"].clone();
    config["vocab_size"] = 32000.into();
    let dir = common::scratch("llama3-gguf");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let parsed = Config::from_json(&config.to_string()).unwrap();
    starling::model::synthetic::write_safetensors(&parsed, &dir).unwrap();
    std::fs::copy(common::tokenizer_model(), dir.join("tokenizer.model")).unwrap();
    let gguf = dir.join("tiny-llama3.gguf");
    common::ok(&quantize_f32(&dir, &gguf));
    let file = starling::weights::gguf::Gguf::open(&gguf).unwrap();
    let factors = file
        .config()
        .rope_freq_factors
        .clone()
        .expect("rope_freqs.weight");
    assert_eq!(factors.len(), 8);
    assert!(
        factors.contains(&8.0) && factors.contains(&1.0),
        "{factors:?}"
    );
    let worst = worst_gguf_against_dir(&gguf, &dir, 70, 32000);
    assert!(worst <= 1e-4, "GGUF and directory differ by {worst}");
}

#[test]
fn a_synthetic_shape_takes_a_gguf_vocabulary() {
    // What the Llama 3 8B race quantizes: random weights of a shape, with
    // llama.cpp's Llama 3 vocabulary file as --vocab.
    let mut config = reference()["models"]["tiny-llama3"]["config"].clone();
    config["vocab_size"] = 128256.into();
    config["bos_token_id"] = 128000.into();
    let dir = common::scratch("synthetic-bpe");
    let shape = dir.join("config.json");
    std::fs::write(&shape, config.to_string()).unwrap();
    let out = dir.join("l3.gguf");
    let vocab = common::vocab_dir().join("ggml-vocab-llama-bpe.gguf");
    common::ok(&common::starling(
        &[
            "quantize",
            &format!("synthetic:{}", shape.display()),
            out.to_str().unwrap(),
            "--type",
            "q8_0",
            "--vocab",
            vocab.to_str().unwrap(),
        ],
        None,
    ));
    let written = starling::weights::gguf::read_vocab(&out).unwrap();
    assert!(matches!(&written, starling::tokenizer::Vocab::Bpe(v) if v.pre_name == "llama-bpe"));
    // A vocabulary larger than the shape is refused.
    config["vocab_size"] = 1000.into();
    std::fs::write(&shape, config.to_string()).unwrap();
    common::fails_with(
        &common::starling(
            &[
                "quantize",
                &format!("synthetic:{}", shape.display()),
                out.to_str().unwrap(),
                "--vocab",
                vocab.to_str().unwrap(),
            ],
            None,
        ),
        "more than the shape's vocab_size of 1000",
    );
}

#[test]
fn a_qwen2_directory_quantized_to_gguf_answers_as_the_directory_does() {
    // llama.cpp's `qwen2` architecture: biases as blk.N.attn_{q,k,v}.bias,
    // q/k rows in transformers' order (rope on halves), tied embeddings.
    let mut config = reference()["models"]["tiny-qwen2"]["config"].clone();
    config["bos_token_id"] = Value::Null;
    let dir = write_family_dir(
        "qwen2-quantize",
        &config,
        "qwen2",
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        ("", "<|im_end|>"),
        &[151645, 151643],
    );
    let gguf = dir.join("qwen2.gguf");
    common::ok(&quantize_f32(&dir, &gguf));
    let file = starling::weights::gguf::Gguf::open(&gguf).unwrap();
    assert_eq!(
        file.config().family().unwrap(),
        starling::model::Family::Qwen2
    );
    let worst = worst_gguf_against_dir(&gguf, &dir, 40, 151936);
    assert!(worst <= 1e-4, "GGUF and directory differ by {worst}");
    let conv = serde_json::json!([{"role": "user", "content": "Hello"}]);
    assert_eq!(tokenize(&gguf, &conv), tokenize(&dir, &conv));
    // <|im_end|> and <|endoftext|> end a GGUF's answer as a directory's.
    let file = starling::weights::gguf::Gguf::open(&gguf).unwrap();
    let stops = starling::loader::text_from_gguf(&file, "auto")
        .unwrap()
        .stop_ids;
    assert_eq!(stops, [151643, 151645]);
}

/// The largest logit difference, over `positions` pseudo-random ids below
/// `vocab`, between the GGUF that `starling quantize` wrote and the
/// directory it came from (both in f32).
fn worst_gguf_against_dir(
    gguf: &std::path::Path,
    dir: &std::path::Path,
    positions: u32,
    vocab: u32,
) -> f32 {
    let cpu = candle_core::Device::Cpu;
    let file = starling::weights::gguf::Gguf::open(gguf).unwrap();
    let weights = Weights::open(&[gguf.to_path_buf()]).unwrap();
    let from_gguf = Model::load(file.config(), &weights, candle_core::DType::F32, &cpu).unwrap();
    let config = Config::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&[dir.join("model.safetensors")]).unwrap();
    let from_dir = Model::load(&config, &weights, candle_core::DType::F32, &cpu).unwrap();
    let ids: Vec<u32> = (0..positions).map(|i| (i * 7919 + 13) % vocab).collect();
    let logits = |m: &Model| -> Vec<Vec<f32>> {
        m.forward(&ids, &mut m.new_cache(), Logits::All)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let (a, b) = (logits(&from_gguf), logits(&from_dir));
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Linear scaling goes into a GGUF as llama.cpp's converter writes it
/// (`rope.scaling.type` and `.factor`) and comes back; dynamic scaling,
/// which llama.cpp does not have, is refused before anything is written.
#[test]
fn rope_scaling_types_go_into_gguf_files_or_are_refused_by_name() {
    let mut config = reference()["models"]["tiny-llama-linear"]["config"].clone();
    config["bos_token_id"] = 128000.into();
    let dir = llama_3_1_dir("linear-quantize", &config);
    let gguf = dir.join("linear.gguf");
    common::ok(&quantize_f32(&dir, &gguf));
    let file = starling::weights::gguf::Gguf::open(&gguf).unwrap();
    assert_eq!(
        file.config().rope_scaling().unwrap(),
        starling::model::config::RopeScaling::Linear { factor: 4.0 }
    );
    // general.name is the model's own name, not the path it was made from.
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(&gguf).unwrap())
            .unwrap();
    let name = content.metadata["general.name"]
        .to_string()
        .unwrap()
        .clone();
    assert_eq!(name, dir.file_name().unwrap().to_str().unwrap());
    let worst = worst_gguf_against_dir(&gguf, &dir, 100, 128256);
    assert!(worst <= 1e-4, "GGUF and directory differ by {worst}");

    let dynamic = reference()["models"]["tiny-llama-dynamic"]["config"]["rope_scaling"].clone();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["rope_scaling"] = dynamic;
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let out = dir.join("dynamic.gguf");
    common::fails_with(
        &quantize_f32(&dir, &out),
        "writing dynamic rope scaling as GGUF is not supported",
    );
    assert!(!out.exists());
}

/// A base model with no chat template (Llama 3.0, Qwen2.5 base): the
/// fallback's "<s>" is not a special token of a byte-level vocabulary, so
/// `auto` says so and names `--template raw`, which answers.
#[test]
fn a_byte_level_model_without_a_chat_template_is_pointed_at_raw() {
    for (name, vocab) in [("tiny-llama3", "llama-bpe"), ("tiny-qwen2", "qwen2")] {
        let mut config = reference()["models"][name]["config"].clone();
        config["bos_token_id"] = Value::Null;
        let dir = write_family_dir(
            &format!("{vocab}-base"),
            &config,
            vocab,
            "Qwen-Qwen2.5-7B-Instruct.jinja",
            ("", "<|endoftext|>"),
            &[],
        );
        let path = dir.join("tokenizer_config.json");
        let mut tc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        tc.as_object_mut().unwrap().remove("chat_template");
        std::fs::write(&path, tc.to_string()).unwrap();
        let model = dir.to_str().unwrap();
        common::fails_with(
            &common::starling(&["run", "--model", model, "Hello"], None),
            "needs the special token \"<s>\", which this vocabulary does not have (--template raw",
        );
        common::ok(&common::starling(
            &[
                "run",
                "--model",
                model,
                "--template",
                "raw",
                "-n",
                "3",
                "Hello",
            ],
            None,
        ));
    }
}

/// `starling quantize FROM TO --type f32`.
fn quantize_f32(from: &std::path::Path, to: &std::path::Path) -> std::process::Output {
    common::starling(
        &[
            "quantize",
            from.to_str().unwrap(),
            to.to_str().unwrap(),
            "--type",
            "f32",
        ],
        None,
    )
}

/// A Llama 3.1-shaped directory of `config` (its vocabulary, template and end ids).
fn llama_3_1_dir(name: &str, config: &Value) -> std::path::PathBuf {
    write_family_dir(
        name,
        config,
        "llama-bpe",
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        ("<|begin_of_text|>", "<|eot_id|>"),
        &[128001, 128008, 128009],
    )
}
