//! Prompt processing over Q4_0 weights: `q8_0_panel`'s panel and loop, the
//! sixteen rows unpacked from nibbles. A Q4_0 value `q − 8` is stored in the
//! panel as `q − 8 + 128`, the unsigned byte a Q8_0 weight becomes there, so
//! the multiply and its `128 · Σx` correction are Q8_0's. Q4_0 prompts took
//! the row kernel (`q4_0`) before.

use super::q4_0::BLOCK_BYTES;
use super::q4k::f16;
use super::q8_0_panel::{self, Q8Sum};

/// Sixteen rows of Q4_0 blocks unpacked for `vpdpbusd` (the layout of
/// `q8_0_panel::Panel`).
#[derive(Default)]
pub struct Panel(q8_0_panel::Panel);

impl Panel {
    /// Whether this CPU has the instructions (`q4k::have_vnni`).
    pub fn available() -> bool {
        q8_0_panel::Panel::available()
    }

    /// Unpacks the `ROWS` rows that start at `rows[0]`, `row_bytes` apart.
    ///
    /// # Panics
    /// If `rows` holds fewer than `ROWS` rows, or the CPU lacks the
    /// instructions (check `available` first).
    pub fn pack(&mut self, rows: &[u8], row_bytes: usize) {
        self.0.pack_q4_0(rows, row_bytes)
    }

    /// `out[t·stride + r] = row r · token t` for every token of `xs` and the
    /// `ROWS` rows of the last `pack`.
    pub fn multiply(&self, xs: &[&[Q8Sum]], out: &mut [f32], stride: usize) {
        self.0.multiply(xs, out, stride)
    }
}

/// Plain-Rust dot product of one Q4_0 row (value `j` of a block is
/// `qs[j]`'s low nibble, value `j + 16` its high one, each minus 8) with
/// these activations: the reference, and what rows outside a whole panel
/// take.
pub fn dot_scalar(row: &[u8], x: &[Q8Sum]) -> f32 {
    row.chunks_exact(BLOCK_BYTES)
        .zip(x)
        .map(|(b, xb)| {
            let mut isum = 0i32;
            for (j, &q) in b[2..].iter().enumerate() {
                isum += ((q & 0xF) as i32 - 8) * xb.qs[j] as i32;
                isum += ((q >> 4) as i32 - 8) * xb.qs[j + 16] as i32;
            }
            f16(&b[..2]) * xb.d * isum as f32
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::super::q4k_panel::ROWS;
    use super::super::q8_0_panel::{QK, quantize};
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn the_scalar_dot_is_the_dequantized_product() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (1, 256), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
        let deq: Vec<f32> = q
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, 256, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut xq = vec![Q8Sum::zeros(); 8];
        quantize(&x, &mut xq);
        let exact: f32 = deq.iter().zip(&x).map(|(a, b)| a * b).sum();
        let got = dot_scalar(&q.data().unwrap(), &xq);
        // Only x's rounding to 8 bits differs (see `q8_0_panel`'s test).
        let scale: f32 = deq.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
        assert!(
            (got - exact).abs() < 0.02 * scale,
            "{got} vs {exact} (scale {scale})"
        );
    }

    /// The panel against the scalar reference, on rows that do not start at
    /// the first one, an odd number of blocks (pairs, then one alone), 6
    /// tokens (a group of four and two single ones), and on blocks of
    /// extreme bytes (values all 15, all 0, or alternating) against
    /// activations of ±127.
    #[test]
    fn a_panel_computes_what_the_scalar_dot_does() {
        if !Panel::available() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        let (rows, cols, tokens) = (ROWS + 2, 17 * QK, 6);
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap();
        let random = QTensor::quantize(&w, GgmlDType::Q4_0)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        let row_bytes = cols / QK * BLOCK_BYTES;
        let mut extreme = vec![0u8; rows * row_bytes];
        for (i, block) in extreme.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            block[2..].fill([0xFFu8, 0x00, 0x0F, 0xF0, 0x5A][i % 5]);
            block[..2].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        }
        let mut x: Vec<f32> = Tensor::randn(0f32, 1.0, tokens * cols, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        x[..cols].fill(1.0);
        x[cols..2 * cols].fill(-1.0);
        let mut xq = vec![Q8Sum::zeros(); tokens * cols / QK];
        for (x, q) in x.chunks_exact(cols).zip(xq.chunks_exact_mut(cols / QK)) {
            quantize(x, q);
        }
        let xs: Vec<&[Q8Sum]> = xq.chunks_exact(cols / QK).collect();
        for (bytes, first) in [(&random, 2), (&extreme, 0)] {
            // Rows 2..18: a panel that does not start at the first row.
            let mut panel = Panel::default();
            panel.pack(&bytes[2 * row_bytes..], row_bytes);
            let stride = ROWS + 3;
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
                    let row = &bytes[(2 + r) * row_bytes..(3 + r) * row_bytes];
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
