//! The session's prefix reuse: a follow-up prompt feeds only the tokens the
//! cache has not seen, and answers exactly as a fresh session would.

mod common;

use candle_core::{DType, Device};
use common::{golden, ids};
use starling::engine::{Prefill, Request, Sampler, SamplerConfig, Session, generate};
use starling::model::{Config, Model, synthetic};
use starling::tokenizer::TextTokenizer;

/// A fresh session on the golden model, whose file is written once per
/// test binary (tests run in parallel; rewriting it under another test's
/// map would feed that test a half-written file).
fn session() -> Session {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let cfg = Config::from_json(&golden()["config"].to_string()).unwrap();
    let dir = DIR.get_or_init(|| {
        let dir = common::scratch("session-model");
        synthetic::write_safetensors(&cfg, &dir).unwrap();
        dir
    });
    let weights = starling::weights::Weights::open(&[dir.join("model.safetensors")]).unwrap();
    Session::new(Model::load(&cfg, &weights, DType::F32, &Device::Cpu).unwrap())
}

fn greedy() -> SamplerConfig {
    SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    }
}

fn tokenizer() -> TextTokenizer {
    let files = starling::source::local_dir(&common::tiny_model()).unwrap();
    let cfg = starling::tokenizer::TokenizerConfig::from_file(
        files.tokenizer.tokenizer_config.as_ref().unwrap(),
    )
    .unwrap();
    TextTokenizer::load(&files.tokenizer, Some(&cfg)).unwrap()
}

fn answer(
    session: &mut Session,
    tok: &TextTokenizer,
    prompt: &[u32],
) -> (Vec<u32>, starling::engine::Stats) {
    let request = Request {
        prompt,
        max_tokens: 12,
        stop_ids: &[],
        stop_texts: &[],
        interrupt: None,
        continuation: false,
    };
    let out = generate(
        session,
        tok,
        &mut Sampler::new(greedy()),
        &request,
        &mut |_| Ok(()),
    )
    .unwrap();
    (out.ids, out.stats)
}

#[test]
fn a_follow_up_feeds_only_new_tokens_and_answers_as_from_scratch() {
    let tok = tokenizer();
    let single = ids(&golden()["cases"][0]["prompt"]["ids"]);
    let multi = ids(&golden()["cases"][1]["prompt"]["ids"]);
    assert!(multi.starts_with(&single[..single.len() - 2]));

    let mut warm = session();
    let (first, stats) = answer(&mut warm, &tok, &single);
    assert_eq!((stats.cached_tokens, stats.new_tokens), (0, single.len()));
    assert_eq!(first, ids(&golden()["cases"][0]["greedy"]["ids"])[..12]);

    // The multi-turn prompt shares a prefix with what the cache holds.
    let common_len = warm
        .fed()
        .iter()
        .zip(&multi)
        .take_while(|(a, b)| a == b)
        .count();
    let (second, stats) = answer(&mut warm, &tok, &multi);
    assert_eq!(stats.cached_tokens, common_len);
    assert_eq!(stats.new_tokens, multi.len() - common_len);
    assert!(stats.new_tokens < multi.len());

    let (fresh, _) = answer(&mut session(), &tok, &multi);
    assert_eq!(second, fresh);
    assert_eq!(second, ids(&golden()["cases"][1]["greedy"]["ids"])[..12]);
}

#[test]
fn the_same_prompt_twice_refeeds_only_its_last_token() {
    let mut s = session();
    let prompt = ids(&golden()["cases"][0]["prompt"]["ids"]);
    let (a, p1) = s.prefill(&prompt).unwrap();
    let (b, p2) = s.prefill(&prompt).unwrap();
    assert_eq!(
        p1,
        Prefill {
            cached: 0,
            new: prompt.len()
        }
    );
    assert_eq!(
        p2,
        Prefill {
            cached: prompt.len() - 1,
            new: 1
        }
    );
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
}
