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
    use super::super::q8_0_panel::QK;
    use super::super::qmatmul::check_panel;
    use super::*;

    /// 17 blocks a row (pairs of blocks, then one alone); extreme blocks of
    /// values all 15, all 0, or mixed.
    #[test]
    fn a_panel_computes_what_the_scalar_dot_does() {
        let extreme = |i: usize, block: &mut [u8]| {
            block[2..].fill([0xFFu8, 0x00, 0x0F, 0xF0, 0x5A][i % 5]);
            block[..2].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        };
        check_panel::<Panel>(
            candle_core::quantized::GgmlDType::Q4_0,
            17 * QK,
            extreme,
            dot_scalar,
        );
    }
}
