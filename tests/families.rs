//! The Llama 3 and Qwen2 families on tiny models (tests/family-weights.md):
//! RoPE scaling (llama3, linear), tied embeddings, GQA, q/k/v biases,
//! against a numpy re-implementation of transformers' code
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
fn logits_and_greedy_ids_match_transformers_code() {
    let r = reference();
    let models = r["models"].as_object().unwrap();
    assert_eq!(models.len(), 3);
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
                    .forward(&[id], &mut cache, Logits::Last)
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
        err.contains("\"yarn\" is not supported (default, linear, llama3)"),
        "{err}"
    );
    let err = with(&|c| c["rope_scaling"]["factor"] = serde_json::json!(-1.0));
    assert!(err.contains("factor is -1"), "{err}");
    let err = with(&|c| c["rope_scaling"]["high_freq_factor"] = serde_json::json!(0.5));
    assert!(err.contains("must be above low_freq_factor"), "{err}");
    let err = with(&|c| {
        c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        c["model_type"] = serde_json::json!("qwen2");
        c["use_sliding_window"] = serde_json::json!(true);
    });
    assert!(err.contains("use_sliding_window"), "{err}");
}
