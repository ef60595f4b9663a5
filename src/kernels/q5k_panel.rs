//! Prompt processing over Q5_K weights: `q4k_panel`'s panel and loop, the
//! sixteen rows unpacked with each value's fifth bit or-ed in (values up to
//! 31 stay unsigned bytes for `vpdpbusd`). Q5_K_M files keep most of their
//! matrices in this format; their prompts took the row kernel before.

use super::q4k::Q8K;
use super::q4k_panel;

/// Sixteen rows of Q5_K blocks unpacked for `vpdpbusd` (the layout of
/// `q4k_panel::Panel`).
#[derive(Default)]
pub struct Panel(q4k_panel::Panel);

impl Panel {
    /// Whether this CPU has the instructions (`q4k::have_vnni`).
    pub fn available() -> bool {
        q4k_panel::Panel::available()
    }

    /// Unpacks the `ROWS` rows that start at `rows[0]`, each `row_bytes`
    /// long and `row_bytes` apart.
    ///
    /// # Panics
    /// If `rows` holds fewer than `ROWS` rows, or the CPU lacks the
    /// instructions (check `available` first).
    pub fn pack(&mut self, rows: &[u8], row_bytes: usize) {
        self.0.pack_q5k(rows, row_bytes)
    }

    /// `out[t·stride + r] = row r · token t` for every token of `xs` and the
    /// `ROWS` rows of the last `pack`.
    pub fn multiply(&self, xs: &[&[Q8K]], out: &mut [f32], stride: usize) {
        self.0.multiply(xs, out, stride)
    }
}

#[cfg(test)]
mod tests {
    use super::super::q4k::{QK, quantize_q8k};
    use super::super::q4k_panel::ROWS;
    use super::super::q5k::{BLOCK_BYTES, dot_scalar};
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// The panel against the scalar reference, on rows that do not start at
    /// the first one, 7 tokens (a group of four and three single ones), and
    /// on blocks of extreme bytes (every value 31, 0, or alternating fifth
    /// bits; all scales and mins 63, or mixed) against activations of ±127.
    #[test]
    fn a_panel_computes_what_the_row_kernel_does() {
        if !Panel::available() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        let (rows, cols, tokens) = (ROWS + 3, 1024, 7);
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap();
        let random = QTensor::quantize(&w, GgmlDType::Q5K)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        let row_bytes = cols / QK * BLOCK_BYTES;
        let mut extreme = vec![0u8; rows * row_bytes];
        for (i, block) in extreme.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            let fill = [0xFFu8, 0x00, 0x55, 0xAA, 0x0F, 0xF0][i % 6];
            block[4..].fill(fill);
            if i % 2 == 1 {
                // Scales and mins that differ from sub-block to sub-block.
                for (s, byte) in block[4..16].iter_mut().enumerate() {
                    *byte = (41 * s + 7) as u8;
                }
            }
            block[0..2].copy_from_slice(&half::f16::ONE.to_le_bytes());
            block[2..4].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        }
        let mut x: Vec<f32> = Tensor::randn(0f32, 1.0, tokens * cols, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        x[..cols].fill(1.0);
        x[cols..2 * cols].fill(-1.0);
        let mut xq = vec![Q8K::zeros(); tokens * cols / QK];
        for (x, q) in x.chunks_exact(cols).zip(xq.chunks_exact_mut(cols / QK)) {
            quantize_q8k(x, q);
        }
        let xs: Vec<&[Q8K]> = xq.chunks_exact(cols / QK).collect();
        for (bytes, first) in [(&random, 2), (&extreme, 0)] {
            // Rows 3..19: a panel that does not start at the first row.
            let mut panel = Panel::default();
            panel.pack(&bytes[3 * row_bytes..], row_bytes);
            let stride = ROWS + 5;
            let mut out = vec![f32::NAN; tokens * stride];
            panel.multiply(&xs, &mut out, stride);
            // Tokens 0 and 1 (all +1, all −1) against random rows would
            // sum ±Σw, a near-total cancellation of terms hundreds of times
            // larger than the result, where the panel's and the scalar
            // kernel's float orders differ by more than the bound (the
            // Q5_K test failed so about once in 40 runs): those tokens are
            // held to it on the extreme rows only.
            for (t, x) in xs.iter().enumerate().skip(first) {
                for r in 0..ROWS {
                    let row = &bytes[(3 + r) * row_bytes..(4 + r) * row_bytes];
                    let want = dot_scalar(row, x);
                    let got = out[t * stride + r];
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "token {t} row {r}: {got} vs {want}"
                    );
                }
                assert!(
                    out[t * stride + ROWS].is_nan(),
                    "wrote past the panel's rows"
                );
            }
        }
    }
}
