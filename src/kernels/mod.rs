//! CPU matrix kernels: quantized blocks (Q4_0, Q4_K, Q5_K, Q6_K and Q8_0 through AVX-512
//! VNNI, with panels for prompts) and bf16, and the driver that spreads a
//! matrix product over threads. Pure functions over slices, each tested
//! against a scalar reference; `model::linear` chooses among them.

pub(crate) mod bf16;
pub(crate) mod q4_0;
pub(crate) mod q4k;
pub(crate) mod q4k_panel;
pub(crate) mod q5k;
pub(crate) mod q6k;
pub(crate) mod q8_0;
pub(crate) mod q8_0_panel;
pub(crate) mod qmatmul;

/// Deterministic values in [-1, 1) for the kernels' tests (an LCG: the same
/// inputs on every run, so a tolerance that holds once holds always).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}
