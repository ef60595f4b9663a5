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
    use super::super::q4k_panel::extreme_block;
    use super::super::q5k::dot_scalar;
    use super::super::qmatmul::check_panel;
    use super::*;

    #[test]
    fn a_panel_computes_what_the_scalar_kernel_does() {
        check_panel::<Panel>(
            candle_core::quantized::GgmlDType::Q5K,
            1024,
            extreme_block,
            dot_scalar,
        );
    }
}
