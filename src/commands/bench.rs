//! `starling bench`: prompt-processing and generation speed, like
//! llama-bench: a prefill of `-p` tokens and `-n` single-token decode steps
//! after it, repeated `-r` times on a fresh cache; the median and the spread
//! of tokens/s, the weights' bytes and the peak memory. `--synthetic` builds
//! the real shape of a model in memory from the deterministic-weights
//! formula, so anyone can measure without a download.

use crate::cli::BenchArgs;
use crate::engine::{
    DEFAULT_BATCH_TOKENS, Engine, EngineConfig, Event, GenerateRequest, SamplerConfig,
};
use crate::loader;
use crate::model::{Config, Logits, Model, synthetic};
use crate::weights::Weights;
use anyhow::{Result, bail};
use std::sync::Arc;
use std::time::Instant;

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.repetitions == 0 {
        bail!("-r must be at least 1");
    }
    // -p 0 skips the prompt test, as llama-bench's does; the streams of
    // --parallel and --gap-prompt each need a prompt.
    if args.prompt_tokens == 0 {
        if !args.parallel.is_empty() || args.gap_prompt.is_some() {
            bail!("--parallel and --gap-prompt need a prompt: -p must be at least 1");
        }
        if args.gen_tokens == 0 {
            bail!("nothing to measure: -p and -n are both 0");
        }
    }
    // Checked before anything is loaded or allocated: a sum that wraps
    // would pass the context check below and size a prompt by it.
    let Some(total) = args.prompt_tokens.checked_add(args.gen_tokens) else {
        bail!(
            "-p {} plus -n {} is past any context",
            args.prompt_tokens,
            args.gen_tokens
        );
    };
    let device = loader::device(&args.device.device)?;
    let start = Instant::now();
    let (label, config, weights) = match &args.synthetic {
        Some(name) => (
            format!("synthetic {name}"),
            synthetic::shape(name)?,
            Weights::synthetic(&synthetic::shape(name)?),
        ),
        None => {
            let (files, _) = super::model_files(&args.model)?;
            if files.weights.is_empty() {
                bail!("{} has no weights", files.dir.display());
            }
            let weights = Weights::open(&files.weights)?;
            weights.ensure_not_reward_model(files.origin())?;
            let config = match (weights.gguf(), &files.config) {
                (Some(gguf), _) => gguf.config().clone(),
                (None, Some(path)) => Config::from_file(path)?,
                (None, None) => bail!("{} has no config.json", files.dir.display()),
            };
            (args.model.model.clone(), config, weights)
        }
    };
    let weights = weights.quantize_to(args.device.quantize);
    let dtype = loader::model_dtype(args.device.dtype(), &weights, &config, &device)?;
    let mut model = Model::load(&config, &weights, dtype, &device)?;
    args.device.apply_kv_type(&mut model);
    let load_s = start.elapsed().as_secs_f64();
    // Measured as a long-running process sees it: after the weights have
    // moved into memory (the move is timed on its own line).
    let resident = weights.finish(&device, args.device.keep_mapped);
    // A model that copied its weights at load leaves nothing to move.
    let resident = resident
        .map(|mover| mover.wait())
        .filter(|r| r.moved + r.repacked > 0);
    if let Some(r) = resident.as_ref().filter(|_| !args.json) {
        // A failure is the move's own note on stderr.
        let repacked = match r.repacked {
            0 => String::new(),
            b => format!(" ({} of it repacked)", shown_bytes(b)),
        };
        println!(
            "weights moved into memory after loading: {} of {} in {:.2} s{repacked}",
            shown_bytes(r.moved + r.repacked),
            shown_bytes(r.total),
            r.seconds,
        );
    }
    let (p, n) = (args.prompt_tokens, args.gen_tokens);
    if total > model.max_len() {
        bail!(
            "-p {p} plus -n {n} exceeds the model's context of {} tokens",
            model.max_len()
        );
    }
    if let Some(long) = args.gap_prompt.filter(|&long| long > model.max_len()) {
        bail!(
            "--gap-prompt {long} is longer than the model's context of {} tokens",
            model.max_len()
        );
    }
    let vocab = config.vocab_size as u32;
    let model = if args.parallel.is_empty() && args.gap_prompt.is_none() {
        model
    } else {
        let shared = Arc::new(model);
        if !args.parallel.is_empty() {
            let moved_s = resident.as_ref().map(|r| r.seconds);
            parallel(args, shared.clone(), &label, (load_s, moved_s), vocab)?;
        }
        if let Some(long) = args.gap_prompt {
            gap(args, shared.clone(), long, vocab)?;
        }
        if !args.parallel.is_empty() {
            return Ok(());
        }
        // The gap's engine has stopped: the single-stream figures follow.
        Arc::try_unwrap(shared).map_err(|_| anyhow::anyhow!("the engine still holds the model"))?
    };
    let prompt: Vec<u32> = (0..p as u32)
        .map(|i| (i.wrapping_mul(7919) + 13) % vocab)
        .collect();

    // One short warm-up outside the measurements (thread pools, first allocations).
    let mut cache = model.new_cache();
    if p > 0 {
        model.forward(&prompt[..p.min(8)], &mut cache, Logits::Last)?;
    }
    model.forward_token(1, &mut cache)?;

    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..args.repetitions {
        let mut cache = model.new_cache();
        if p > 0 {
            let t = Instant::now();
            model.forward(&prompt, &mut cache, Logits::Last)?;
            device.synchronize()?;
            pp.push(p as f64 / t.elapsed().as_secs_f64());
        }
        if n > 0 {
            let t = Instant::now();
            for i in 0..n {
                model.forward_token((i as u32 * 31 + 7) % vocab, &mut cache)?;
                // A GPU runs ahead of the host: wait, as sampling would, so
                // each step is timed whole.
                device.synchronize()?;
            }
            tg.push(n as f64 / t.elapsed().as_secs_f64());
        }
    }

    let bytes = model.weight_bytes();
    let streamed = model.streamed_bytes_per_token();
    let format = model.weight_format();
    println!("| model | weights | size | test | t/s (median) | min – max |");
    println!("|---|---|---|---|---|---|");
    for (test, rates) in [(format!("pp{p}"), &mut pp), (format!("tg{n}"), &mut tg)] {
        if rates.is_empty() {
            continue;
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "| {label} | {format} | {:.2} GB | {test} | {:.2} | {:.2} – {:.2} |",
            bytes as f64 / 1e9,
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1]
        );
    }
    // Before the probe, whose buffer must not count as the model's memory.
    let peak = peak_rss_bytes()
        .map(|b| format!("{:.2} GB", b as f64 / 1e9))
        .unwrap_or_else(|| "n/a".into());
    println!(
        "\nload {load_s:.2} s · peak RSS {peak} · activations {:?} · KV cache {:?} · device {} · {} threads · {} repetitions",
        model.compute_dtype(),
        model.kv_dtype(),
        args.device.device,
        candle_core::utils::get_num_threads(),
        args.repetitions
    );
    if device.is_cpu() {
        println!("cpu {}", cpu_description());
    }
    // Generation reads every matrix once per token: bandwidth / bytes is
    // its ceiling. The KV cache adds its own reads (reported beside it).
    let kv_per_position = model.kv_bytes_per_position();
    if n > 0 && device.is_cpu() {
        drop(model);
        let (gbps, how) = match args.bandwidth {
            Some(b) => (b, "given".to_string()),
            None => (read_bandwidth_gbps(), "read probe, median of 5".to_string()),
        };
        let ceiling = gbps * 1e9 / streamed as f64;
        let tg_median = tg[tg.len() / 2];
        println!(
            "bandwidth {gbps:.1} GB/s ({how}) · {:.2} GB of matrices per token · generation ceiling {ceiling:.2} t/s · tg{n} at {:.0}% of it · KV cache {:.1} MB read per token at position {}",
            streamed as f64 / 1e9,
            100.0 * tg_median / ceiling,
            kv_per_position as f64 * (p + n) as f64 / 1e6,
            p + n
        );
    }
    Ok(())
}

/// `bytes` in GB, or MB below a gigabyte (tiny test models).
fn shown_bytes(bytes: u64) -> String {
    match bytes {
        0..1_000_000_000 => format!("{:.2} MB", bytes as f64 / 1e6),
        _ => format!("{:.2} GB", bytes as f64 / 1e9),
    }
}

/// Prompt rows per engine step in `--parallel` runs unless `--batch-tokens`
/// says otherwise: llama-batched-bench's physical batch (`-ub`, 512 by
/// default), so both engines feed B prompts of p tokens in the same passes.
/// A step's activations grow with its rows (about 0.2 MB a row for a 7B),
/// so 8 prompts of 128 in one pass of 1024 rows held twice the memory.
const UBATCH: usize = 512;

/// `--parallel B,...`: for each B, B streams through the engine, each with
/// its own prompt (no prefix shared between streams or repetitions), as
/// llama-batched-bench measures: aggregate prompt speed (all B prompts over
/// the time to the last stream's first token), aggregate generation speed
/// (the B × (n-1) decode-step tokens over the time from the last first
/// token to the end), per stream, time to first token, peak RSS; medians
/// over the repetitions.
fn parallel(
    args: &BenchArgs,
    model: Arc<Model>,
    label: &str,
    (load_s, moved_s): (f64, Option<f64>),
    vocab: u32,
) -> Result<()> {
    let (p, n) = (args.prompt_tokens, args.gen_tokens);
    let weights_bytes = model.weight_bytes();
    if !args.json {
        println!(
            "| model | B | pp | tg | prompt t/s | gen t/s | gen t/s per stream | ttft s | peak RSS |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
    }
    let mut salt = 0u32;
    for &b in &args.parallel {
        let config = EngineConfig {
            parallel: b,
            batch_tokens: args.batch_tokens.unwrap_or((b * p).min(UBATCH)),
            context: Some(p + n),
        };
        let engine = Engine::start(model.clone(), None, config)?;
        let mut distinct_prompt = || {
            salt += 1;
            synthetic_prompt(p, salt, vocab)
        };
        // Warm-up outside the measurements.
        let warm: Vec<u32> = distinct_prompt().into_iter().take(8).collect();
        engine
            .submit(request(warm, 2))?
            .wait(&mut |_| Ok(()), None)?;
        let (mut pp, mut tg, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.repetitions {
            let start = Instant::now();
            let handles = (0..b)
                .map(|_| engine.submit(request(distinct_prompt(), n.max(1))))
                .collect::<Result<Vec<_>>>()?;
            let mut last_first = 0f64;
            for h in handles {
                let outcome = h.wait(&mut |_| Ok(()), None)?;
                if outcome.stats.gen_tokens != n.max(1) {
                    bail!("a stream stopped after {} tokens", outcome.stats.gen_tokens);
                }
                last_first = last_first.max(outcome.stats.ttft_s);
            }
            let total = start.elapsed().as_secs_f64();
            ttft.push(last_first);
            pp.push((b * p) as f64 / last_first);
            if n > 1 {
                tg.push((b * (n - 1)) as f64 / (total - last_first));
            }
        }
        let median = |v: &mut Vec<f64>| {
            if v.is_empty() {
                return 0.0;
            }
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (pp, tg, ttft) = (median(&mut pp), median(&mut tg), median(&mut ttft));
        let peak = peak_rss_bytes().unwrap_or(0);
        if args.json {
            let line = serde_json::json!({
                "model": label,
                "parallel": b,
                "prompt_tokens": p,
                "gen_tokens": n,
                "prompt_tps": pp,
                "gen_tps": tg,
                "gen_tps_per_stream": tg / b as f64,
                "ttft_s": ttft,
                "load_s": load_s,
                "weights_moved_s": moved_s,
                "weights_bytes": weights_bytes,
                "peak_rss_bytes": peak,
                "threads": candle_core::utils::get_num_threads(),
            });
            println!("{line}");
        } else {
            println!(
                "| {label} | {b} | {p} | {n} | {pp:.2} | {tg:.2} | {:.2} | {ttft:.3} | {:.2} GB |",
                tg / b as f64,
                peak as f64 / 1e9
            );
        }
    }
    if !args.json {
        println!(
            "\nload {load_s:.2} s · weights {:.2} GB · {} threads · {} repetitions · batch {} rows per step",
            weights_bytes as f64 / 1e9,
            candle_core::utils::get_num_threads(),
            args.repetitions,
            args.batch_tokens
                .map_or_else(|| format!("B × p up to {UBATCH}"), |t| t.to_string())
        );
        println!("cpu {}", cpu_description());
    }
    Ok(())
}

/// `--gap-prompt N`: one stream generates; after its first tokens a
/// prompt of N tokens arrives. Prints the stream's longest pause between
/// two tokens while that prompt was read (about one chunk's prefill if the
/// engine interleaves, the whole prompt's if it does not).
fn gap(args: &BenchArgs, model: Arc<Model>, long: usize, vocab: u32) -> Result<()> {
    let p = args.prompt_tokens;
    let batch_tokens = args.batch_tokens.unwrap_or(DEFAULT_BATCH_TOKENS);
    // Room for the running stream to go on for as long as the prompt takes.
    let context = (long + 1).max(p + 64).max(2 * long + p);
    let config = EngineConfig {
        parallel: 2,
        batch_tokens,
        context: Some(context),
    };
    let engine = Engine::start(model, None, config)?;
    let prompt = |len: usize, salt: u32| synthetic_prompt(len, salt, vocab);
    let running = engine.submit(request(prompt(p, 1), context - p))?;
    let tick = std::time::Duration::from_millis(1);
    // The stream is under way after three tokens; what it queued so far
    // does not count.
    let mut tokens = 0;
    while tokens < 3 {
        match running.recv_timeout(tick)? {
            Some(Event::Token { .. }) => tokens += 1,
            Some(Event::Finished(_)) => bail!("the running stream ended early"),
            Some(Event::Failed(e)) => return Err(e),
            Some(Event::Text(_)) | None => {}
        }
    }
    while running.recv_timeout(std::time::Duration::ZERO)?.is_some() {}
    let arrived = Instant::now();
    let newcomer = engine.submit(request(prompt(long, 2), 1))?;
    let mut last = arrived;
    let mut gaps = Vec::new();
    // One thread watches both: the stream's tokens until the newcomer's
    // first (and only) token, which ends its prompt.
    let read_s = loop {
        match newcomer.recv_timeout(std::time::Duration::ZERO)? {
            Some(Event::Finished(outcome)) => break outcome.stats.ttft_s,
            Some(Event::Failed(e)) => return Err(e),
            _ => {}
        }
        match running.recv_timeout(tick)? {
            Some(Event::Token { .. }) => {
                let now = Instant::now();
                gaps.push((now - last).as_secs_f64());
                last = now;
            }
            Some(Event::Failed(e)) => return Err(e),
            Some(Event::Finished(_)) => {
                bail!("the running stream ended before the prompt was read")
            }
            Some(Event::Text(_)) | None => {}
        }
    };
    running.cancel();
    gaps.sort_by(f64::total_cmp);
    let longest = gaps.last().copied().unwrap_or(read_s);
    let median = gaps.get(gaps.len() / 2).copied().unwrap_or(read_s);
    if args.json {
        let line = serde_json::json!({
            "gap_prompt": long,
            "batch_tokens": batch_tokens,
            "prompt_s": read_s,
            "stream_tokens": gaps.len(),
            "longest_pause_s": longest,
            "median_pause_s": median,
        });
        println!("{line}");
    } else {
        println!(
            "long-prompt gap: while a {long}-token prompt was read ({read_s:.2} s, chunks of {batch_tokens} rows), the running stream made {} tokens; its longest pause {longest:.3} s, median {median:.3} s",
            gaps.len(),
        );
    }
    Ok(())
}

/// A greedy request for exactly `max_tokens` tokens (no end token, no stop
/// text): what the engine benchmarks time.
fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: SamplerConfig {
            temperature: 0.0,
            ..SamplerConfig::default()
        },
        max_tokens,
        stop_ids: Vec::new(),
        stop_texts: Vec::new(),
        continuation: false,
        logprobs: None,
    }
}

/// `len` ids that differ from the first on for each `salt` (no two share a
/// kept prefix, which would inflate the figures).
fn synthetic_prompt(len: usize, salt: u32, vocab: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(7919) ^ salt.wrapping_mul(104_729)) % vocab)
        .collect()
}

/// Read bandwidth of main memory in GB/s: every thread of the pool sums a
/// share of a 1 GiB buffer (far larger than any cache); the median of five
/// passes (the best of five once read 61 GB/s on a machine whose other
/// passes read 36: a median is not fooled by one lucky pass).
pub fn read_bandwidth_gbps() -> f64 {
    use rayon::prelude::*;
    let words = 128 << 20; // 1 GiB of u64
    let buffer: Vec<u64> = (0..words as u64).collect();
    let mut rates: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let sum: u64 = buffer
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
                .reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum);
            (words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[2]
}

/// The CPU's model name, family and model numbers, caches and the vector
/// features the kernels choose by (speeds differ between machines: every
/// race names its CPU). A virtual machine may name only the vendor ("AMD
/// EPYC" for a Zen 4 and a Zen 5 alike), so the family and model numbers
/// and the caches are what tell the cores apart.
fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    #[cfg(target_arch = "x86_64")]
    let features: Vec<&str> = [
        ("avx512f", std::is_x86_feature_detected!("avx512f")),
        ("avx512_vnni", std::is_x86_feature_detected!("avx512vnni")),
        ("avx512_bf16", std::is_x86_feature_detected!("avx512bf16")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    #[cfg(not(target_arch = "x86_64"))]
    let features: Vec<&str> = Vec::new();
    describe_cpu(&info, &cache_sizes(), &features)
}

/// `cpu_description` from the text of `/proc/cpuinfo`, the caches
/// (`cache_sizes`) and the detected features.
fn describe_cpu(cpuinfo: &str, caches: &[String], features: &[&str]) -> String {
    // The first processor's fields: `key<tabs>: value`.
    let field = |key: &str| {
        cpuinfo
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let mut parts = vec![field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string())];
    if let (Some(family), Some(model)) = (field("cpu family"), field("model")) {
        parts[0] = format!("{} (family {family} model {model})", parts[0]);
    }
    if !caches.is_empty() {
        parts.push(caches.join(" "));
    }
    if !features.is_empty() {
        parts.push(features.join(" "));
    }
    parts.join(" · ")
}

/// The first core's caches as Linux lists them
/// (`/sys/devices/system/cpu/cpu0/cache/index*/`): `L1d 32K`, `L2 1024K`, ...
fn cache_sizes() -> Vec<String> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    (0..8)
        .filter_map(|i| {
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(format!("index{i}/{f}")))
                    .ok()
                    .map(|v| v.trim().to_string())
            };
            let level = read("level")?;
            let kind = match read("type")?.as_str() {
                "Data" => "d",
                "Unified" => "",
                _ => return None,
            };
            Some(format!("L{level}{kind} {}", read("size")?))
        })
        .collect()
}

/// The process's peak resident memory (Linux: VmHWM), if the OS says.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::describe_cpu;

    #[test]
    fn the_cpu_line_names_family_model_and_caches() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: other\n";
        let caches = ["L1d 32K".to_string(), "L2 1024K".to_string()];
        assert_eq!(
            describe_cpu(info, &caches, &["avx512f"]),
            "AMD EPYC (family 25 model 17) · L1d 32K L2 1024K · avx512f"
        );
        // Nothing readable: the architecture, and no empty fields.
        assert_eq!(describe_cpu("", &[], &[]), std::env::consts::ARCH);
        // A model name without family numbers is kept as it is.
        assert_eq!(
            describe_cpu("model name : Xeon\n", &[], &["avx512f"]),
            "Xeon · avx512f"
        );
    }
}
