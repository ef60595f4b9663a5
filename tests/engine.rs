//! The engine's continuous batching: a sequence answers the same whether it
//! runs alone or batched with others that start at different steps, with
//! and without a sliding window smaller than the prompts; cancelling frees
//! the slot and leaves a consistent kept prefix.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{golden, ids};
use starling::engine::{
    Engine, EngineConfig, Request, Sampler, SamplerConfig, Session, StopReason, generate,
};
use starling::model::{Chunk, Config, Logits, Model, synthetic};
use starling::tokenizer::TextTokenizer;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The golden model, or with `window` as its sliding window. Each file is
/// written once per test binary: tests run in parallel and map it.
fn model(window: Option<usize>) -> Model {
    model_in(window, DType::F32)
}

/// The golden model with `window`, loaded in `dtype`.
fn model_in(window: Option<usize>, dtype: DType) -> Model {
    static DIRS: Mutex<Vec<(Option<usize>, PathBuf)>> = Mutex::new(Vec::new());
    let mut dirs = DIRS.lock().unwrap();
    let dir = match dirs.iter().find(|(w, _)| *w == window) {
        Some((_, dir)) => dir.clone(),
        None => {
            let dir = common::scratch(&format!("engine-model-{}", window.unwrap_or(0)));
            let config = common::config_json(|c| {
                if let Some(w) = window {
                    c["sliding_window"] = w.into();
                }
            });
            let cfg = Config::from_json(&config.to_string()).unwrap();
            synthetic::write_safetensors(&cfg, &dir).unwrap();
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            dirs.push((window, dir.clone()));
            dir
        }
    };
    drop(dirs);
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let weights = starling::weights::Weights::open(&[dir.join("model.safetensors")]).unwrap();
    Model::load(&cfg, &weights, dtype, &Device::Cpu).unwrap()
}

fn tokenizer() -> Arc<TextTokenizer> {
    Arc::new(common::load_tokenizer(&common::tiny_model()))
}

/// The golden prompts and others of different lengths (3 to 61 ids).
fn prompts() -> Vec<Vec<u32>> {
    let mut all = vec![
        ids(&golden()["cases"][0]["prompt"]["ids"]),
        ids(&golden()["cases"][1]["prompt"]["ids"]),
    ];
    for (n, len) in [3usize, 9, 23, 61, 30, 12].into_iter().enumerate() {
        all.push(
            (0..len as u32)
                .map(|i| 1 + (i * 7919 + n as u32 * 104729) % 31999)
                .collect(),
        );
    }
    all
}

fn argmax(row: &[f32]) -> u32 {
    starling::engine::sampler::argmax(row)
}

/// Greedy decode alone: the logits after the prompt and after each of `n` tokens.
fn alone(model: &Model, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = model.new_cache();
    let mut logits = model.forward(prompt, &mut cache, Logits::Last).unwrap();
    let (mut out, mut rows) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let row = logits.to_vec1::<f32>().unwrap();
        let token = argmax(&row);
        rows.push(row);
        out.push(token);
        logits = model.forward_token(token, &mut cache).unwrap();
    }
    (out, rows)
}

/// All prompts through `forward_batch`: sequence k starts at step k, its
/// prompt prefilled in chunks of `chunk` ids while the earlier ones decode.
fn batched(
    model: &Model,
    prompts: &[Vec<u32>],
    n: usize,
    chunk: usize,
) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut done = vec![0usize; prompts.len()];
    let mut pending = vec![0u32; prompts.len()];
    let mut out: Vec<(Vec<u32>, Vec<Vec<f32>>)> = vec![(Vec::new(), Vec::new()); prompts.len()];
    for step in 0.. {
        let mut batch = Vec::new();
        let mut who = Vec::new();
        for (k, cache) in caches.iter_mut().enumerate() {
            if step < k || out[k].0.len() == n {
                continue;
            }
            let p = &prompts[k];
            if done[k] < p.len() {
                let to = p.len().min(done[k] + chunk);
                batch.push(Chunk {
                    ids: &p[done[k]..to],
                    cache,
                    logits: to == p.len(),
                    seq_len: p.len(),
                    prompt: true,
                });
                who.push((k, to == p.len()));
                done[k] = to;
            } else {
                let seq_len = cache.len() + 1;
                batch.push(Chunk {
                    ids: std::slice::from_ref(&pending[k]),
                    cache,
                    logits: true,
                    seq_len,
                    prompt: false,
                });
                who.push((k, true));
            }
        }
        if batch.is_empty() {
            break;
        }
        let logits = model.forward_batch(&mut batch).unwrap();
        drop(batch);
        let mut row = 0;
        for (k, wants) in who {
            if !wants {
                continue;
            }
            let values = f32_row(&logits.as_ref().unwrap().get(row).unwrap());
            row += 1;
            pending[k] = argmax(&values);
            out[k].0.push(pending[k]);
            out[k].1.push(values);
        }
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn batched_matches_alone(window: Option<usize>) {
    let model = model(window);
    let prompts = prompts();
    let n = 10;
    for chunk in [5, 64] {
        let together = batched(&model, &prompts, n, chunk);
        for (k, prompt) in prompts.iter().enumerate() {
            let (ids, rows) = alone(&model, prompt, n);
            assert_eq!(
                together[k].0, ids,
                "sequence {k} (chunk {chunk}): greedy ids differ"
            );
            for (step, (a, b)) in rows.iter().zip(&together[k].1).enumerate() {
                let d = max_diff(a, b);
                assert!(
                    d <= 1e-4,
                    "sequence {k} step {step} (chunk {chunk}): logits differ by {d}"
                );
            }
        }
    }
}

/// In f16 the CPU runs candle's path, CUDA's: there the decode rows of a
/// step are roped in one call for all sequences, each with its own
/// position. candle's f16 products are not batch-invariant, so this holds
/// the logits to f16's rounding, not to bits; a row roped at another
/// sequence's position is off by far more.
#[test]
fn batched_f16_sequences_on_candles_path_stay_near_their_single_runs() {
    let model = model_in(None, DType::F16);
    let prompts = prompts();
    let n = 6;
    let together = batched(&model, &prompts, n, 64);
    let mut worst = 0f32;
    for (k, prompt) in prompts.iter().enumerate() {
        // Alone, fed the batched run's own tokens: a near tie that flips
        // cannot send the two down different paths.
        let mut cache = model.new_cache();
        let mut logits = model.forward(prompt, &mut cache, Logits::Last).unwrap();
        for (step, (&token, row)) in together[k].0.iter().zip(&together[k].1).enumerate() {
            let d = max_diff(&f32_row(&logits), row);
            worst = worst.max(d);
            assert!(
                d <= 0.05,
                "sequence {k} step {step}: f16 logits differ by {d}"
            );
            logits = model.forward_token(token, &mut cache).unwrap();
        }
    }
    eprintln!("largest f16 logit difference, batched against alone: {worst}");
}

fn f32_row(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn a_sequence_batched_with_others_gives_its_single_run_logits() {
    batched_matches_alone(None);
}

#[test]
fn batched_sequences_keep_a_sliding_window_smaller_than_their_prompts() {
    // The window must matter here, or this test would not test it.
    let (windowed, full) = (model(Some(8)), model(None));
    let prompt = &prompts()[5];
    let a = windowed
        .forward(prompt, &mut windowed.new_cache(), Logits::Last)
        .unwrap();
    let b = full
        .forward(prompt, &mut full.new_cache(), Logits::Last)
        .unwrap();
    assert!(max_diff(&a.to_vec1().unwrap(), &b.to_vec1().unwrap()) > 1e-3);
    batched_matches_alone(Some(8));
}

use common::greedy_request as greedy;

/// The answer a single-sequence session gives.
fn session_answer(window: Option<usize>, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let tok = tokenizer();
    let mut session = Session::new(model(window));
    let request = Request {
        prompt,
        max_tokens,
        stop_ids: &[],
        stop_texts: &[],
        interrupt: None,
        continuation: false,
    };
    let mut sampler = Sampler::new(greedy(0, vec![]).sampling);
    generate(&mut session, &tok, &mut sampler, &request, &mut |_| Ok(()))
        .unwrap()
        .ids
}

#[test]
fn the_engine_answers_each_request_as_a_single_run_would() {
    for window in [None, Some(8)] {
        let config = EngineConfig {
            parallel: 4,
            batch_tokens: 7,
            context: None,
        };
        let engine = Engine::start(model(window), Some(tokenizer()), config).unwrap();
        let prompts = prompts();
        // Eight requests on four slots: the later ones wait, then start while
        // others are mid-answer; a prompt takes several steps to prefill.
        let mut handles = Vec::new();
        for p in &prompts {
            handles.push(engine.submit(greedy(9, p.clone())).unwrap());
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
        for (p, h) in prompts.iter().zip(handles) {
            let mut streamed = String::new();
            let mut on_text = |t: &str| {
                streamed.push_str(t);
                Ok(())
            };
            let outcome = h.wait(&mut on_text, None).unwrap();
            assert_eq!(
                outcome.ids,
                session_answer(window, p, 9),
                "window {window:?}"
            );
            assert_eq!(outcome.text, streamed);
            assert_eq!(outcome.stop, StopReason::MaxTokens);
            assert_eq!(outcome.stats.gen_tokens, 9);
        }
    }
}

#[test]
fn cancelling_frees_the_slot_and_keeps_a_consistent_prefix() {
    let config = EngineConfig {
        parallel: 1,
        batch_tokens: 16,
        context: None,
    };
    let engine = Engine::start(model(None), Some(tokenizer()), config).unwrap();
    let first = prompts()[3].clone();
    let long = engine.submit(greedy(100_000, first.clone())).unwrap();
    let queued = engine.submit(greedy(5, prompts()[4].clone())).unwrap();
    // Let the long answer run a few tokens, then cancel it.
    loop {
        match long.recv() {
            Some(starling::engine::Event::Token { .. }) => {}
            Some(starling::engine::Event::Text(_)) => break,
            other => panic!("expected text, got {other:?}"),
        }
    }
    long.cancel();
    let cut = long.wait(&mut |_| Ok(()), None).unwrap();
    assert_eq!(cut.stop, StopReason::Interrupted);
    assert!(cut.stats.gen_tokens >= 1 && cut.stats.gen_tokens < 100_000);
    // The queued request got the slot.
    let next = queued.wait(&mut |_| Ok(()), None).unwrap();
    assert_eq!(next.ids, session_answer(None, &prompts()[4], 5));

    // A follow-up on the cancelled answer reuses what is kept and answers as from scratch.
    let again = engine.submit(greedy(4, first.clone())).unwrap();
    let again = again.wait(&mut |_| Ok(()), None).unwrap();
    assert_eq!(
        again.stats.cached_tokens, 0,
        "the slot was taken by the queued request"
    );
    let mut follow = first.clone();
    follow.extend(&again.ids);
    follow.push(13);
    let reused = engine
        .submit(greedy(6, follow.clone()))
        .unwrap()
        .wait(&mut |_| Ok(()), None)
        .unwrap();
    assert!(
        reused.stats.cached_tokens >= first.len(),
        "{:?}",
        reused.stats
    );
    assert_eq!(reused.ids, session_answer(None, &follow, 6));
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_at_once() {
    let config = EngineConfig {
        parallel: 2,
        batch_tokens: 16,
        context: Some(32),
    };
    let engine = Engine::start(model(None), Some(tokenizer()), config).unwrap();
    let err = engine
        .submit(greedy(4, vec![5; 40]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("40 tokens, longer than the model's context of 32"),
        "{err}"
    );
    // The context ends an answer that outgrows it.
    let out = engine
        .submit(greedy(100, vec![5; 30]))
        .unwrap()
        .wait(&mut |_| Ok(()), None)
        .unwrap();
    assert_eq!(out.stop, StopReason::ContextFull);
    assert_eq!(out.context_len, 32);
}

/// n answers to one prompt share its prefill: the prompt is fed once, the
/// others start from a copy of its cache, each with its own seed.
#[test]
fn n_answers_share_one_prefill() {
    let config = EngineConfig {
        parallel: 4,
        batch_tokens: 64,
        context: None,
    };
    let engine = Engine::start(model(None), Some(tokenizer()), config).unwrap();
    let prompt = prompts()[1].clone();
    let handles = engine.submit_n(greedy(7, prompt.clone()), 3).unwrap();
    let outcomes: Vec<_> = handles
        .into_iter()
        .map(|h| h.wait(&mut |_| Ok(()), None).unwrap())
        .collect();
    let alone = session_answer(None, &prompt, 7);
    for (i, o) in outcomes.iter().enumerate() {
        assert_eq!(o.ids, alone, "answer {i}");
        let fed_here = o.stats.prompt_tokens - o.stats.cached_tokens;
        assert_eq!(
            fed_here,
            if i == 0 { prompt.len() } else { 0 },
            "answer {i}"
        );
    }
    // Sampled: each answer draws with its own seed, reproducibly.
    let sampled = |seed: u64| -> Vec<Vec<u32>> {
        let mut request = greedy(12, prompt.clone());
        request.sampling = SamplerConfig {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..SamplerConfig::default()
        };
        engine
            .submit_n(request, 3)
            .unwrap()
            .into_iter()
            .map(|h| h.wait(&mut |_| Ok(()), None).unwrap().ids)
            .collect()
    };
    let (a, b) = (sampled(7), sampled(7));
    assert_eq!(a, b);
    assert!(a[0] != a[1] && a[1] != a[2], "{a:?}");
    assert!(engine.submit_n(greedy(1, prompt.clone()), 5).is_err());
}

/// A Q4_K model (the golden layout at dimensions its blocks divide).
fn quantized_model() -> Model {
    quantized_model_as(candle_core::quantized::GgmlDType::Q4K)
}

/// `quantized_model` with its matrices in `dtype`.
fn quantized_model_as(dtype: candle_core::quantized::GgmlDType) -> Model {
    let config = common::config_json(|c| {
        c["hidden_size"] = 256.into();
        c["intermediate_size"] = 512.into();
        c["head_dim"] = 64.into();
    });
    let cfg = Config::from_json(&config.to_string()).unwrap();
    let weights = starling::weights::Weights::synthetic(&cfg).quantize_to(Some(dtype));
    Model::load(&cfg, &weights, DType::F32, &Device::Cpu).unwrap()
}

/// The kernels are batch-invariant: a sequence's logits are bitwise those
/// of its run alone, whatever shares its steps (decode rows of others,
/// their prompt chunks of any size) and wherever its prompt is cut (the
/// run alone takes the whole prompt at once).
#[test]
fn a_quantized_sequences_logits_are_bitwise_independent_of_the_batch() {
    use candle_core::quantized::GgmlDType;
    // Q4_K: decode rows through the row kernels, prompts through the
    // panels; Q8_0: both through the panels' sums.
    for dtype in [GgmlDType::Q4K, GgmlDType::Q8_0] {
        sequences_alone_and_batched_agree(&quantized_model_as(dtype), &format!("{dtype:?}"));
    }
}

fn sequences_alone_and_batched_agree(model: &Model, format: &str) {
    let prompts = prompts();
    for chunk in [16, 5, 1] {
        let together = batched(model, &prompts, 6, chunk);
        for (k, prompt) in prompts.iter().enumerate() {
            let alone = batched(model, std::slice::from_ref(prompt), 6, 1000).remove(0);
            assert_eq!(
                together[k].0, alone.0,
                "{format}: sequence {k} (chunks of {chunk})"
            );
            for (step, (a, b)) in alone.1.iter().zip(&together[k].1).enumerate() {
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{format}: sequence {k} step {step} (chunks of {chunk}): logits differ by {}",
                    max_diff(a, b)
                );
            }
        }
    }
}

/// Same seed, same answer, whatever else is in the batch: sampled answers
/// of ten requests on four slots equal their runs alone, in a fresh engine
/// that takes each prompt in one chunk. In the shared engine prompts are
/// cut into chunks of 16, and the last two share most of their prompt with
/// earlier ones, so they feed only the rest after a kept prefix.
#[test]
fn same_seed_same_answer_whatever_else_is_in_the_batch() {
    let sampled = |prompt: &Vec<u32>, seed: u64| {
        let mut r = greedy(10, prompt.clone());
        r.sampling = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..SamplerConfig::default()
        };
        r
    };
    let engine = |parallel, batch_tokens| {
        let config = EngineConfig {
            parallel,
            batch_tokens,
            context: None,
        };
        Engine::start(quantized_model(), None, config).unwrap()
    };
    let mut prompts = prompts();
    for (k, tail) in [(5, 3u32), (3, 11)] {
        let mut shared = prompts[k][..prompts[k].len() - 4].to_vec();
        shared.extend([tail, tail + 1]);
        prompts.push(shared);
    }
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let e = engine(1, 512);
            e.submit(sampled(p, i as u64))
                .unwrap()
                .wait(&mut |_| Ok(()), None)
                .unwrap()
                .ids
        })
        .collect();
    let shared = engine(4, 16);
    let mut handles = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        handles.push(shared.submit(sampled(p, i as u64)).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.wait(&mut |_| Ok(()), None).unwrap().ids,
            expected[i],
            "request {i}"
        );
    }
}

/// An f16 KV cache (the default for quantized weights, as llama.cpp's)
/// takes half the memory, and answers stay close to an f32 cache's (the
/// default for f32 weights, `--kv-type f32`).
#[test]
fn an_f16_kv_cache_halves_the_memory_and_stays_close_to_f32() {
    assert_eq!(model(None).kv_dtype(), DType::F32);
    let mut q = quantized_model();
    assert_eq!(q.kv_dtype(), DType::F16);
    let half_bytes = q.kv_bytes_per_position();
    let prompt = &prompts()[5];
    let mut half_cache = q.new_cache();
    let a = q.forward(prompt, &mut half_cache, Logits::Last).unwrap();
    let a2 = q.forward_token(7, &mut half_cache).unwrap();
    q.set_kv_dtype(DType::F32);
    assert_eq!(q.kv_bytes_per_position(), 2 * half_bytes);
    let mut full_cache = q.new_cache();
    let b = q.forward(prompt, &mut full_cache, Logits::Last).unwrap();
    let b2 = q.forward_token(7, &mut full_cache).unwrap();
    for (a, b) in [(a, b), (a2, b2)] {
        let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        let spread =
            b.iter().cloned().fold(f32::MIN, f32::max) - b.iter().cloned().fold(f32::MAX, f32::min);
        let d = max_diff(&a, &b);
        assert!(d > 0.0, "the f16 cache was not used");
        assert!(
            d < 5e-2 * spread,
            "f16 cache: logits differ by {d} (spread {spread})"
        );
        assert_eq!(argmax(&a), argmax(&b));
    }
}
