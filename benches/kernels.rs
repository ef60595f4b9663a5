//! Whether each CPU matrix kernel can keep up with memory: one generation
//! step's product (`[1, k] @ w.T`) on weights that sit in the L3 cache
//! (the kernel's own speed) and on weights far larger than any cache (what
//! generation sees), in GB of stored weights per second, on 1 and 2
//! threads, beside the read probe of `starling bench` (the machine's
//! bandwidth, measured in the same sitting). A kernel whose in-cache rate
//! is not well above the read rate is compute-bound and leaves bandwidth
//! unused.
//!
//! Run: `cargo bench --bench kernels [-- FORMAT...]` (e.g. `-- Q4K BF16`).
//!
//! With `-- --rows M [FORMAT...]`: the compute side of a batch instead. M
//! activation rows (a decode step of M sequences, or a prompt chunk) over
//! in-cache weights, through the row kernels (decode) and the prompt
//! kernels (prefill), in rows × GB of weights per second: how fast a
//! kernel turns weights into outputs once memory is not the limit. Add
//! `--cols K` for matrices K values wide (default 4096; a 7B's FFN down
//! projection is 14336), as many rows as keep 16.8 M values per matrix.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use starling::kernels::RowClass;
use starling::model::linear::Linear;
use std::time::Instant;

/// Matrices of `rows × cols` values in `format`, `count` of them (distinct,
/// so a pass over all of them streams `count ×` the bytes of one).
fn matrices(
    format: GgmlDType,
    rows: usize,
    cols: usize,
    count: usize,
) -> anyhow::Result<Vec<Linear>> {
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
    (0..count)
        .map(|i| {
            let w = (&w + i as f64 * 1e-3)?;
            Ok(match format {
                GgmlDType::BF16 => Linear::dense(w.to_dtype(DType::BF16)?)?,
                f => Linear::quantized(std::sync::Arc::new(QTensor::quantize(&w, f)?))?,
            })
        })
        .collect()
}

/// GB of weights per second multiplying `x` by every matrix in turn, as
/// generation does (the row kernels).
fn rate(ms: &[Linear], x: &Tensor, passes: usize) -> f64 {
    rate_as(ms, x, passes, RowClass::Rows)
}

/// `rate` through the kernels of `class`.
fn rate_as(ms: &[Linear], x: &Tensor, passes: usize, class: RowClass) -> f64 {
    let bytes: usize = ms.iter().map(|m| m.bytes()).sum();
    let mut best = f64::MAX;
    for _ in 0..passes {
        let t = Instant::now();
        for m in ms {
            std::hint::black_box(m.forward_as(x, class).unwrap());
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

/// `--rows M`: rows × GB/s of in-cache weights through the row kernels
/// and the prompt kernels, on 2 threads.
fn batch_rates(m: usize, cols: usize, only: &[String]) -> anyhow::Result<()> {
    let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu)?;
    let n = (4096 * 4096 / cols).max(1);
    println!("{m} activation rows of {cols}, {n} weight rows, 2 threads (rows x GB/s):");
    for format in FORMATS {
        if !only.is_empty() && !only.contains(&format!("{format:?}").to_uppercase()) {
            continue;
        }
        // 4096 x 4096: a 7B's attention matrix, in the L3 cache (9.4 MB
        // at Q4_K), large enough that a product's fixed costs are small.
        let cached = matrices(format, n, cols, 1)?;
        let passes = (100 / m).max(5);
        let rows = m as f64 * rate_as(&cached, &x, passes, RowClass::Rows);
        let prompt = m as f64 * rate_as(&cached, &x, passes, RowClass::Prompt);
        let per = cached[0].bytes();
        let streamed = matrices(format, n, cols, (600 << 20) / (per * 8) + 1)?;
        let s_rows = m as f64 * rate_as(&streamed, &x, 3, RowClass::Rows);
        let s_prompt = m as f64 * rate_as(&streamed, &x, 3, RowClass::Prompt);
        println!(
            "  {format:?}: row kernels {rows:.1} in cache, {s_rows:.1} streamed; prompt kernels {prompt:.1} in cache, {s_prompt:.1} streamed"
        );
        // With the repacked copies a model's decode steps use (Q4_K).
        if repack(&cached) && repack(&streamed) {
            let rows = m as f64 * rate_as(&cached, &x, passes, RowClass::Rows);
            let s_rows = m as f64 * rate_as(&streamed, &x, 3, RowClass::Rows);
            println!("  {format:?} repacked: {rows:.1} in cache, {s_rows:.1} streamed");
        }
    }
    Ok(())
}

/// Makes the repacked copies of `ms` (as a model's first decode step
/// does); false where a matrix has none (its format, or this CPU).
fn repack(ms: &[Linear]) -> bool {
    ms.iter().all(|m| match m {
        Linear::CpuQuantized(q) => q.repack().is_some_and(|r| {
            r.plan(false, None);
            r.make(true, true);
            r.copy().is_some()
        }),
        _ => false,
    })
}

const FORMATS: [GgmlDType; 6] = [
    GgmlDType::Q4K,
    GgmlDType::Q6K,
    GgmlDType::Q5K,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::BF16,
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows = args
        .iter()
        .position(|a| a == "--rows")
        .map(|i| -> anyhow::Result<usize> {
            let m = args.get(i + 1).map(|v| v.parse()).transpose()?;
            m.filter(|&m| m > 0)
                .ok_or_else(|| anyhow::anyhow!("--rows needs a count of at least 1"))
        })
        .transpose()?;
    let cols = args
        .iter()
        .position(|a| a == "--cols")
        .map(|i| -> anyhow::Result<usize> {
            let k = args.get(i + 1).map(|v| v.parse()).transpose()?;
            k.filter(|&k| k > 0 && k % 256 == 0)
                .ok_or_else(|| anyhow::anyhow!("--cols needs a multiple of 256"))
        })
        .transpose()?
        .unwrap_or(4096);
    let only: Vec<String> = args
        .iter()
        .filter(|a| !a.starts_with('-') && a.parse::<usize>().is_err())
        .map(|a| a.to_uppercase())
        .collect();
    if let Some(m) = rows {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
        return pool.install(|| batch_rates(m, cols, &only));
    }
    let x = Tensor::randn(0f32, 1.0, (1, 4096), &Device::Cpu)?;
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        pool.install(|| -> anyhow::Result<()> {
            let read = starling::commands::bench::read_bandwidth_gbps();
            println!("{threads} thread(s): plain read {read:.1} GB/s");
            for format in FORMATS {
                if !only.is_empty() && !only.contains(&format!("{format:?}").to_uppercase()) {
                    continue;
                }
                // ~2 MB in cache; ~600-800 MB streamed.
                let cached = matrices(format, 512, 4096, 1)?;
                let per = cached[0].bytes();
                let streamed = matrices(format, 4096, 4096, (600 << 20) / (per * 8) + 1)?;
                let (c, s) = (rate(&cached, &x, 200), rate(&streamed, &x, 3));
                println!(
                    "  {format:?}: in cache {c:.1} GB/s ({:.2}x the read), streamed {s:.1} GB/s ({:.0}% of the read)",
                    c / read,
                    100.0 * s / read
                );
            }
            Ok(())
        })?;
    }
    Ok(())
}
