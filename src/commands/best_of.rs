//! `starling run --best-of N --reward-model RM`: N sampled answers from the
//! chat model (sharing the prompt's prefill, decoded together by the
//! engine), each re-rendered in the reward model's template and scored;
//! the best is printed. Both models stay loaded, so the memory they need
//! together is worked out, said, and checked before either loads.

use super::score::{self, RewardSource};
use crate::cli::RunArgs;
use crate::engine::{GenerateRequest, Handle};
use crate::loader::{self, DTypeChoice};
use crate::source::ModelFiles;
use crate::template::Message;
use crate::weights::Weights;
use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use std::io::Write;

pub fn run(args: &RunArgs, n: usize, conversation: Vec<Message>) -> Result<()> {
    if args.each_line {
        bail!("--best-of answers one prompt; it does not combine with --each-line");
    }
    if args.sampling.temperature.is_some_and(|t| t <= 0.0) {
        bail!("--best-of samples {n} different answers: it needs a --temperature above 0");
    }
    let reward = args
        .best_of
        .reward_args(args.model.offline)
        .context("--best-of needs --reward-model")?;
    let rm_source = score::resolve_reward(&reward)?;
    let (files, template) = super::model_files(&args.model)?;
    let device = loader::device(&args.device.device)?;
    let reward_dtype = plan_memory(&files, &rm_source, args, n, &device)?;

    let started = super::start_engine_with(&files, &template, &args.device, &args.engine, n)?;
    let sampling = args.sampling.resolve(&started.generation)?;
    if sampling.temperature <= 0.0 {
        bail!(
            "--best-of samples {n} different answers, but the temperature is 0 (from the model's generation_config.json): give --temperature above 0"
        );
    }
    let rm = score::load_resolved(
        &rm_source,
        &reward,
        reward_dtype,
        args.best_of.reward_quantize,
        &device,
    )
    .context("loading the reward model (--reward-model, --reward-tokenizer)")?;
    // The reward template must fit the reward tokenizer: known before any
    // answer is generated.
    rm.encode(&[Message::new("user", "?"), Message::new("assistant", "!")])
        .with_context(|| {
            format!(
                "--reward-template {} with the reward model's tokenizer",
                rm.template.name()
            )
        })?;
    if args.answer.verbose {
        eprintln!("{}", started.engine.describe());
    }
    let prompt = started.template.encode(&started.tokenizer, &conversation)?;
    let request = GenerateRequest {
        prompt,
        sampling: sampling.clone(),
        max_tokens: args.sampling.max_tokens,
        stop_ids: started.stop_ids.clone(),
        stop_texts: args.answer.stop.clone(),
        continuation: false,
        logprobs: None,
    };
    // Choice i samples with seed + i, as the server's `n` and as `run --seed`.
    let handles: Vec<Handle> = if n <= started.engine.parallel() {
        started.engine.submit_n(request, n)?
    } else {
        (0..n)
            .map(|i| {
                let mut r = request.clone();
                r.sampling.seed = sampling.seed.wrapping_add(i as u64);
                started.engine.submit(r)
            })
            .collect::<Result<_>>()?
    };
    let outcomes = handles
        .into_iter()
        .map(|h| h.wait(&mut |_| Ok(()), None))
        .collect::<Result<Vec<_>>>()?;
    // The N answers are scored together, in the reward model's own engine.
    let judged: Vec<Vec<Message>> = outcomes
        .iter()
        .map(|o| {
            let mut c = conversation.clone();
            c.push(Message::new("assistant", o.text.clone()));
            c
        })
        .collect();
    let max_len = rm.model.max_len();
    // An answer whose reward cannot be read (not finite) is listed with its
    // error and never chosen; the others still are.
    let results = rm
        .into_engine(score::reward_engine_config(n, max_len))?
        .score_each(&judged);
    let scores: Vec<f32> = results
        .iter()
        .map(|r| *r.as_ref().unwrap_or(&f32::NEG_INFINITY))
        .collect();
    let best = score::ranking(&scores)[0];
    if let Err(e) = &results[best] {
        return Err(anyhow::anyhow!("{e:#}").context("no answer could be scored"));
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        let choices: Vec<serde_json::Value> = outcomes
            .iter()
            .zip(&results)
            .enumerate()
            .map(|(i, (o, r))| {
                let mut choice = serde_json::json!({
                    "index": i,
                    "seed": sampling.seed.wrapping_add(i as u64),
                    "response": o.text,
                    "score": r.as_ref().ok(),
                    "stop_reason": o.stop.as_str(),
                    "gen_tokens": o.stats.gen_tokens,
                });
                if let Err(e) = r {
                    choice["error"] = serde_json::json!(super::error_line(e));
                }
                choice
            })
            .collect();
        let line = serde_json::json!({
            "prompt": conversation.last().map(|m| m.content.as_str()).unwrap_or_default(),
            "best": best,
            "response": outcomes[best].text,
            "score": scores[best],
            "choices": choices,
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(out, "{}", outcomes[best].text)?;
    }
    out.flush()?;
    if args.answer.verbose {
        for (i, r) in results.iter().enumerate() {
            let seed = sampling.seed.wrapping_add(i as u64);
            match r {
                Ok(s) => eprintln!("choice={i} seed={seed} score={s}"),
                Err(e) => eprintln!("choice={i} seed={seed} error={:?}", super::error_line(e)),
            }
        }
    }
    Ok(())
}

/// One way to load a model: the flags it takes and the bytes it needs.
#[derive(Debug, Clone, PartialEq)]
struct LoadChoice {
    flags: Vec<String>,
    bytes: u64,
}

/// Says what the two models need, and refuses before loading when it is
/// more than the memory available (on the CPU), naming flags that fit.
/// Returns the reward model's dtype: as asked, or without `--reward-dtype`
/// f16 for f32 weights that fit only so (said, as a single model's load
/// says it).
fn plan_memory(
    chat_files: &ModelFiles,
    rm: &RewardSource,
    args: &RunArgs,
    n: usize,
    device: &Device,
) -> Result<DTypeChoice> {
    let asked = args.best_of.dtype();
    if chat_files.weights.is_empty() {
        return Ok(asked); // loading says so
    }
    let chat_weights = Weights::open(&chat_files.weights)?;
    let chat_config = match chat_weights.gguf() {
        Some(g) => g.config().clone(),
        None => {
            let path = chat_files
                .config
                .as_ref()
                .with_context(|| format!("{} has no config.json", chat_files.dir.display()))?;
            crate::model::Config::from_file(path)?
        }
    };
    let (rm_config, rm_weights) = crate::reward::open(&rm.files, None)?;
    let chat = |dtype: DTypeChoice, q: Option<GgmlDType>| {
        loader::planned_bytes(&chat_config, &chat_weights, dtype, q, device, false)
    };
    let reward = |dtype: DTypeChoice, q: Option<GgmlDType>| {
        loader::planned_bytes(&rm_config, &rm_weights, dtype, q, device, true)
    };
    let (chat_dtype, rm_dtype) = (args.device.dtype(), asked);
    let chat_now = chat(chat_dtype, args.device.quantize)?;
    // The reward model's KV caches: N inputs of up to 2048 positions (f32
    // on the CPU), scored together.
    let kv = (n * crate::reward::max_tokens(rm_config.max_position_embeddings)) as u64
        * (2 * rm_config.num_hidden_layers * rm_config.num_kv_heads() * rm_config.head_dim() * 4)
            as u64;
    let rm_now = reward(rm_dtype, args.best_of.reward_quantize)? + kv;
    let available = if device.is_cpu() {
        loader::memory_available()
    } else {
        None
    };
    let gb = |b: u64| b as f64 / 1e9;
    let of_available = available
        .map(|a| format!(" of the {:.1} GB available", gb(a)))
        .unwrap_or_default();
    eprintln!(
        "note: --best-of {n} keeps both models loaded: {:.1} GB of chat-model weights and {:.1} GB of reward-model weights and KV cache, {:.1} GB together{of_available}",
        gb(chat_now),
        gb(rm_now),
        gb(chat_now + rm_now)
    );
    let Some(available) = available else {
        return Ok(asked);
    };
    if chat_now + rm_now <= available {
        return Ok(asked);
    }
    if asked == DTypeChoice::Auto && args.best_of.reward_quantize.is_none() {
        let f16 = reward(DTypeChoice::Fixed(DType::F16), None)? + kv;
        if f16 < rm_now && chat_now + f16 <= available {
            eprintln!(
                "note: the reward model needs {:.1} GB in f32 beside the chat model, more than the memory available; loading it in f16 ({:.1} GB)",
                gb(rm_now),
                gb(f16)
            );
            return Ok(DTypeChoice::Fixed(DType::F16));
        }
    }
    // Smaller ways to load each, from the least change on.
    let mut chat_options = vec![LoadChoice {
        flags: vec![],
        bytes: chat_now,
    }];
    if args.device.quantize.is_none() {
        for (flag, q) in [("q8_0", GgmlDType::Q8_0), ("q4k", GgmlDType::Q4K)] {
            chat_options.push(LoadChoice {
                flags: vec![format!("--quantize {flag}")],
                bytes: chat(chat_dtype, Some(q))?,
            });
        }
    }
    let mut rm_options = vec![LoadChoice {
        flags: vec![],
        bytes: rm_now,
    }];
    let reward = |d, q| reward(d, q).map(|b| b + kv);
    if args.best_of.reward_quantize.is_none() {
        if args.best_of.reward_dtype.is_none() {
            let f16 = reward(DTypeChoice::Fixed(DType::F16), None)?;
            if f16 < rm_now {
                rm_options.push(LoadChoice {
                    flags: vec!["--reward-dtype f16".into()],
                    bytes: f16,
                });
            }
        }
        for (flag, q) in [("q8_0", GgmlDType::Q8_0), ("q4k", GgmlDType::Q4K)] {
            rm_options.push(LoadChoice {
                flags: vec![format!("--reward-quantize {flag}")],
                bytes: reward(rm_dtype, Some(q))?,
            });
        }
    }
    let fits = first_fit(&chat_options, &rm_options, available);
    let need = format!(
        "--best-of needs {:.1} GB for the two models (weights, and the reward model's KV cache), more than the {:.1} GB of memory available",
        gb(chat_now + rm_now),
        gb(available)
    );
    match fits {
        Some((flags, bytes)) => bail!(
            "{need}; with {} they take {:.1} GB",
            flags.join(" "),
            gb(bytes)
        ),
        None => bail!("{need}, and no quantization makes them fit"),
    }
}

/// The first pair that fits in `available`, with the fewest flags and,
/// among those, the most bytes (the least loss).
fn first_fit(chat: &[LoadChoice], rm: &[LoadChoice], available: u64) -> Option<(Vec<String>, u64)> {
    let mut pairs: Vec<(Vec<String>, u64)> = chat
        .iter()
        .flat_map(|c| {
            rm.iter().map(move |r| {
                let flags = c.flags.iter().chain(&r.flags).cloned().collect();
                (flags, c.bytes + r.bytes)
            })
        })
        .filter(|(_, bytes)| *bytes <= available)
        .collect();
    pairs.sort_by_key(|(flags, bytes)| (flags.len(), std::cmp::Reverse(*bytes)));
    pairs.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(flags: &[&str], gb: u64) -> LoadChoice {
        LoadChoice {
            flags: flags.iter().map(|s| s.to_string()).collect(),
            bytes: gb * 1_000_000_000,
        }
    }

    #[test]
    fn the_suggestion_changes_least() {
        // A bf16 chat model (14.5) and an f32 7B reward model (27) on 22 GB.
        let chat = [
            opt(&[], 14),
            opt(&["--quantize q8_0"], 8),
            opt(&["--quantize q4k"], 4),
        ];
        let rm = [
            opt(&[], 27),
            opt(&["--reward-dtype f16"], 13),
            opt(&["--reward-quantize q8_0"], 7),
            opt(&["--reward-quantize q4k"], 4),
        ];
        let (flags, bytes) = first_fit(&chat, &rm, 22_000_000_000).unwrap();
        assert_eq!(flags, ["--reward-quantize q8_0"]);
        assert_eq!(bytes, 21_000_000_000);
        let (flags, _) = first_fit(&chat, &rm, 30_000_000_000).unwrap();
        assert_eq!(flags, ["--reward-dtype f16"]);
        let (flags, _) = first_fit(&chat, &rm, 9_000_000_000).unwrap();
        assert_eq!(flags, ["--quantize q4k", "--reward-quantize q4k"]);
        assert!(first_fit(&chat, &rm, 1_000_000_000).is_none());
    }
}
