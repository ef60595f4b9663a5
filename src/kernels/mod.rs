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
