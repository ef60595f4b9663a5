//! `starling bench`: prompt-processing and generation speed, like
//! llama-bench: a prefill of `-p` tokens and `-n` single-token decode steps
//! after it, repeated `-r` times on a fresh cache; the median and the spread
//! of tokens/s, the weights' bytes and the peak memory. `--synthetic` builds
//! the real shape of a model in memory from the deterministic-weights
//! formula, so anyone can measure without a download.

use crate::cli::BenchArgs;
use crate::loader;
use crate::model::{Config, Logits, Model};
use crate::weights::Weights;
use anyhow::{Result, bail};
use std::time::Instant;

/// The shapes `--synthetic` knows by name (config.json fields).
fn shape(name: &str) -> Result<Config> {
    let json = match name {
        "mistral-7b" => {
            r#"{"architectures":["MistralForCausalLM"],"vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":32768,
            "sliding_window":4096,"rms_norm_eps":1e-5,"rope_theta":10000.0}"#
        }
        "llama-7b" => {
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"max_position_embeddings":4096,
            "rms_norm_eps":1e-5}"#
        }
        "tiny" => {
            r#"{"architectures":["MistralForCausalLM"],"vocab_size":32002,"hidden_size":64,"intermediate_size":160,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "max_position_embeddings":8192,"sliding_window":4096,"rms_norm_eps":1e-5}"#
        }
        path if std::path::Path::new(path).is_file() => {
            return Config::from_file(std::path::Path::new(path));
        }
        other => bail!(
            "unknown synthetic shape {other:?} (mistral-7b, llama-7b, tiny, or a config.json path)"
        ),
    };
    Config::from_json(json)
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.prompt_tokens == 0 || args.repetitions == 0 {
        bail!("-p and -r must be at least 1");
    }
    let device = loader::device(&args.device.device)?;
    let start = Instant::now();
    let (label, config, weights) = match &args.synthetic {
        Some(name) => (
            format!("synthetic {name}"),
            shape(name)?,
            Weights::synthetic(&shape(name)?),
        ),
        None => {
            let (files, _) = super::model_files(&args.model)?;
            let config = Config::from_file(&files.config)?;
            if files.weights.is_empty() {
                bail!("{} has no weights", files.dir.display());
            }
            (
                args.model.model.clone(),
                config,
                Weights::open(&files.weights)?,
            )
        }
    };
    let dtype = loader::choose_dtype(
        args.device.dtype(),
        weights.stored_dtype(),
        &config,
        &device,
    )?;
    let model = Model::load(&config, &weights, dtype, &device)?;
    drop(weights);
    let load_s = start.elapsed().as_secs_f64();
    let (p, n) = (args.prompt_tokens, args.gen_tokens);
    if p + n > model.max_len() {
        bail!(
            "-p {p} plus -n {n} exceeds the model's context of {} tokens",
            model.max_len()
        );
    }
    let vocab = config.vocab_size as u32;
    let prompt: Vec<u32> = (0..p as u32)
        .map(|i| (i.wrapping_mul(7919) + 13) % vocab)
        .collect();

    // One short warm-up outside the measurements (thread pools, first allocations).
    let mut cache = model.new_cache();
    model.forward(&prompt[..p.min(8)], &mut cache, Logits::Last)?;
    model.forward(&[1], &mut cache, Logits::Last)?;

    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..args.repetitions {
        let mut cache = model.new_cache();
        let t = Instant::now();
        model.forward(&prompt, &mut cache, Logits::Last)?;
        pp.push(p as f64 / t.elapsed().as_secs_f64());
        if n > 0 {
            let t = Instant::now();
            for i in 0..n {
                model.forward(&[(i as u32 * 31 + 7) % vocab], &mut cache, Logits::Last)?;
            }
            tg.push(n as f64 / t.elapsed().as_secs_f64());
        }
    }

    let bytes = loader::weight_bytes(&config, dtype);
    println!("| model | dtype | weights | test | t/s (median) | min – max |");
    println!("|---|---|---|---|---|---|");
    for (test, rates) in [(format!("pp{p}"), &mut pp), (format!("tg{n}"), &mut tg)] {
        if rates.is_empty() {
            continue;
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "| {label} | {dtype:?} | {:.2} GB | {test} | {:.2} | {:.2} – {:.2} |",
            bytes as f64 / 1e9,
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1]
        );
    }
    let peak = peak_rss_bytes()
        .map(|b| format!("{:.2} GB", b as f64 / 1e9))
        .unwrap_or_else(|| "n/a".into());
    println!(
        "\nload {load_s:.2} s · peak RSS {peak} · device {} · {} threads · {} repetitions",
        args.device.device,
        candle_core::utils::get_num_threads(),
        args.repetitions
    );
    Ok(())
}

/// The process's peak resident memory (Linux: VmHWM), if the OS says.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
