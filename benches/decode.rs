//! The per-token path on a small synthetic model, each figure reported as a
//! ratio against a baseline measured in the same process:
//! - one cached decode step vs recomputing the whole sequence (the KV cache's worth);
//! - a 128-token prefill vs 128 single-token steps;
//! - sampling (top-k 40, top-p, min-p, temperature) vs greedy argmax over a 32k vocabulary;
//! - the same model quantized to Q4_K (own kernels) vs f32: a decode step and a prefill;
//! - streaming decode (the per-token detokenizer) vs one decode of the whole answer,
//!   with the real Mistral tokenizer (`scripts/fetch-test-assets.sh`; skipped without it).
//!
//! Run: `cargo bench --bench decode`.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use starling::engine::{Sampler, SamplerConfig, StreamDecoder};
use starling::model::{Config, Logits, Model, synthetic};
use std::time::Instant;

fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

fn main() -> anyhow::Result<()> {
    let config = Config::from_json(
        r#"{"architectures":["MistralForCausalLM"],"vocab_size":32002,"hidden_size":256,
        "intermediate_size":704,"num_hidden_layers":4,"num_attention_heads":8,"num_key_value_heads":2,
        "max_position_embeddings":4096,"sliding_window":4096,"rms_norm_eps":1e-5}"#,
    )?;
    let dir = tempfile::tempdir()?;
    synthetic::write_safetensors(&config, dir.path())?;
    let weights = starling::weights::Weights::open(&[dir.path().join("model.safetensors")])?;
    let model = Model::load(&config, &weights, DType::F32, &Device::Cpu)?;
    let weights = weights.quantize_to(Some(GgmlDType::Q4K));
    let q4k = Model::load(&config, &weights, DType::F32, &Device::Cpu)?;
    let context: Vec<u32> = (0..256u32).map(|i| (i * 7919) % 32000).collect();

    let mut cache = model.new_cache();
    model.forward(&context, &mut cache, Logits::Last)?;
    let step = median_secs(21, || {
        model.forward_token(42, &mut cache).unwrap();
        cache.truncate(context.len());
    });
    let recompute = median_secs(5, || {
        let mut fresh = model.new_cache();
        let mut seq = context.clone();
        seq.push(42);
        model.forward(&seq, &mut fresh, Logits::Last).unwrap();
    });
    println!(
        "decode step at 256 tokens of context: {:.3} ms cached vs {:.3} ms full recompute: {:.1}x faster",
        step * 1e3,
        recompute * 1e3,
        recompute / step
    );

    let prompt = &context[..128];
    let prefill = median_secs(5, || {
        model
            .forward(prompt, &mut model.new_cache(), Logits::Last)
            .unwrap();
    });
    let one_by_one = median_secs(3, || {
        let mut c = model.new_cache();
        for &t in prompt {
            model.forward_token(t, &mut c).unwrap();
        }
    });
    println!(
        "128-token prefill: {:.1} tok/s batched vs {:.1} tok/s one at a time: {:.1}x",
        128.0 / prefill,
        128.0 / one_by_one,
        one_by_one / prefill
    );

    let logits = Tensor::randn(0f32, 3.0, 32002, &Device::Cpu)?;
    let history: Vec<u32> = (0..64).collect();
    let mut greedy = Sampler::new(SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    });
    let mut sampled = Sampler::new(SamplerConfig {
        repeat_penalty: 1.1,
        seed: 1,
        ..SamplerConfig::default()
    });
    let g = median_secs(101, || {
        greedy.sample(&logits, &history).unwrap();
    });
    let s = median_secs(101, || {
        sampled.sample(&logits, &history).unwrap();
    });
    println!(
        "sampling over 32k: {:.1} us (top-k/top-p/min-p/penalty) vs {:.1} us greedy: {:.2}x; {:.2}% of a decode step",
        s * 1e6,
        g * 1e6,
        s / g,
        100.0 * s / step
    );

    let mut cache = q4k.new_cache();
    q4k.forward(&context, &mut cache, Logits::Last)?;
    let q_step = median_secs(21, || {
        q4k.forward_token(42, &mut cache).unwrap();
        cache.truncate(context.len());
    });
    let q_prefill = median_secs(5, || {
        q4k.forward(prompt, &mut q4k.new_cache(), Logits::Last)
            .unwrap();
    });
    println!(
        "Q4_K vs f32 ({}, {:.1} MB vs {:.1} MB): decode step {:.3} ms vs {:.3} ms: {:.2}x; 128-token prefill {:.1} vs {:.1} tok/s: {:.2}x",
        q4k.weight_format(),
        q4k.weight_bytes() as f64 / 1e6,
        model.weight_bytes() as f64 / 1e6,
        q_step * 1e3,
        step * 1e3,
        step / q_step,
        128.0 / q_prefill,
        128.0 / prefill,
        prefill / q_prefill
    );

    let spm = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-assets/tokenizer.model.v1");
    if !spm.is_file() {
        println!(
            "streaming decode: skipped ({} missing; run scripts/fetch-test-assets.sh)",
            spm.display()
        );
        return Ok(());
    }
    let vocab =
        starling::tokenizer::sentencepiece::SpmVocab::from_model_bytes(&std::fs::read(&spm)?)?;
    let tokenizer = starling::tokenizer::TextTokenizer::from_vocab(&vocab)?;
    let text =
        "Streaming decode keeps spaces, UTF-8 like naïve café, 東京, and emoji 🦀🚀 intact; "
            .repeat(8);
    let ids = tokenizer.encode_text(&text)?;
    let expected = tokenizer.decode(&ids)?;
    let whole = median_secs(21, || {
        tokenizer.decode(&ids).unwrap();
    });
    let streamed = median_secs(21, || {
        let mut stream = StreamDecoder::new(&tokenizer);
        let mut out = String::new();
        for &id in &ids {
            if let Some(piece) = stream.push(id).unwrap() {
                out.push_str(&piece);
            }
        }
        assert_eq!(
            out, expected,
            "the streamed pieces must add up to the decode"
        );
    });
    println!(
        "streaming decode of {} tokens: {:.2} us per token vs {:.2} us per token decoding all at once: {:.1}x; {:.3}% of a Q4_K decode step",
        ids.len(),
        streamed * 1e6 / ids.len() as f64,
        whole * 1e6 / ids.len() as f64,
        streamed / whole,
        100.0 * streamed / ids.len() as f64 / q_step
    );
    Ok(())
}
