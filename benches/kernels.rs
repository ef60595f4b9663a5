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

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use starling::model::linear::Linear;
use std::time::Instant;

/// Matrices of `rows × 4096` values in `format`, `count` of them (distinct,
/// so a pass over all of them streams `count ×` the bytes of one).
fn matrices(format: GgmlDType, rows: usize, count: usize) -> anyhow::Result<Vec<Linear>> {
    let w = Tensor::randn(0f32, 1.0, (rows, 4096), &Device::Cpu)?;
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

/// GB of weights per second multiplying `x` by every matrix in turn.
fn rate(ms: &[Linear], x: &Tensor, passes: usize) -> f64 {
    let bytes: usize = ms.iter().map(|m| m.bytes()).sum();
    let mut best = f64::MAX;
    for _ in 0..passes {
        let t = Instant::now();
        for m in ms {
            std::hint::black_box(m.forward(x).unwrap());
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

fn main() -> anyhow::Result<()> {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.to_uppercase())
        .collect();
    let x = Tensor::randn(0f32, 1.0, (1, 4096), &Device::Cpu)?;
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        pool.install(|| -> anyhow::Result<()> {
            let read = starling::commands::bench::read_bandwidth_gbps();
            println!("{threads} thread(s): plain read {read:.1} GB/s");
            for format in [
                GgmlDType::Q4K,
                GgmlDType::Q6K,
                GgmlDType::Q5K,
                GgmlDType::Q8_0,
                GgmlDType::Q4_0,
                GgmlDType::BF16,
            ] {
                if !only.is_empty() && !only.contains(&format!("{format:?}").to_uppercase()) {
                    continue;
                }
                // ~2 MB in cache; ~600-800 MB streamed.
                let cached = matrices(format, 512, 1)?;
                let per = cached[0].bytes();
                let streamed = matrices(format, 4096, (600 << 20) / (per * 8) + 1)?;
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
