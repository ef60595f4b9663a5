//! Quantized matrix products on the CPU, over the ggml block layout as
//! stored, and for Q4_K and Q6_K over a repacked copy of the same size (Q6_K
//! 1% more) that replaces the file's pages once the model runs (`repack`).
//!
//! Why not candle's `QMatMul` here: on x86 it repacks Q4_K/Q8_0 weights
//! into tiles with f32 scales the first time a matrix is used and keeps
//! both copies, so a 4.1 GB Q4_K model holds 9.5 GB, and every generated
//! token streams the larger (+33%) tiles. Generation on the CPU is bound by
//! memory bandwidth, so this module reads the compact blocks as stored and
//! splits the rows over the thread pool itself: generation through this
//! crate's row kernels (`q4_0`, `q4k`, `q5k`, `q6k`, `q8_0`; candle's
//! `GgmlType::vec_dot` on CPUs without AVX-512 VNNI), prompt positions
//! through panels of sixteen rows unpacked in cache (`q4_0_panel`,
//! `q4k_panel`, `q5k_panel`, `q6k_panel`, `q8_0_panel`).

use super::repack::Repack;
use super::{
    Lanes, RowClass, RowSplit, pool, q4_0, q4_0_panel, q4k, q4k_panel, q5k, q5k_panel, q6k,
    q6k_panel, q8_0, q8_0_panel,
};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use candle_core::quantized::k_quants::{
    BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Rows of the weight matrix per parallel task: small enough to balance two
/// to sixteen threads, large enough that scheduling costs nothing.
pub(super) const ROWS_PER_TASK: usize = 64;

/// A ggml-quantized `[out, in]` matrix in the CPU's memory: its blocks as
/// stored, usually a slice of the model file's memory map (`bytes::Bytes`
/// shares the map, so the weights are the page cache's pages, never copied).
#[derive(Clone)]
pub struct QuantMatrix {
    data: Bytes,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    /// A Q4_K or Q6_K matrix's repacked copy, once planned (`repack`).
    repack: Option<std::sync::Arc<Repack>>,
}

impl QuantMatrix {
    /// `rows × cols` values of `dtype` as ggml blocks, row after row.
    /// `Ok(None)` when this module has no kernel for `dtype` (then candle's
    /// `QMatMul` does the work); an error when the bytes are not exactly
    /// that many whole blocks. Bytes not aligned for the blocks' halves are
    /// copied once (a GGUF's tensors are aligned to 32 bytes, so a file
    /// with `general.alignment = 1` is the only way to get there).
    pub fn new(dtype: GgmlDType, data: Bytes, rows: usize, cols: usize) -> Result<Option<Self>> {
        let supported = matches!(
            dtype,
            GgmlDType::Q4_0 | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K | GgmlDType::Q8_0
        );
        if !supported {
            return Ok(None);
        }
        if rows == 0 || cols == 0 {
            bail!("a {dtype:?} matrix of {rows}×{cols} values holds nothing");
        }
        if !cols.is_multiple_of(dtype.block_size()) {
            bail!(
                "rows of {cols} values are not whole {dtype:?} blocks of {}",
                dtype.block_size()
            );
        }
        let expected = rows
            .checked_mul(cols / dtype.block_size() * dtype.type_size())
            .context("matrix size overflows")?;
        if data.len() != expected {
            bail!(
                "{dtype:?} data holds {} bytes, a {rows}×{cols} matrix needs {expected}",
                data.len()
            );
        }
        let data = super::aligned(data, 2);
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let repack = Repack::new(dtype, &data, rows, row_bytes);
        Ok(Some(Self {
            data,
            dtype,
            rows,
            cols,
            repack,
        }))
    }

    /// A copy of a CPU `QTensor`'s blocks (a matrix quantized while loading).
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        if !q.device().is_cpu() {
            return Ok(None);
        }
        let (rows, cols) = q.shape().dims2()?;
        let data = Bytes::from(q.data()?.into_owned());
        Self::new(q.dtype(), data, rows, cols)
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Values per row (the matrix's input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The blocks as stored, row after row.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Bytes the blocks occupy.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Rows `ids` dequantized to f32, `[ids.len(), cols]` row-major: the
    /// embedding lookup of a quantized table. Errors on an id past the
    /// last row.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * self.cols];
        let row_bytes = self.data.len() / self.rows.max(1);
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let r = id as usize;
            if r >= self.rows {
                bail!("token id {id} is past the {} rows of the table", self.rows);
            }
            let row = &self.data[r * row_bytes..(r + 1) * row_bytes];
            match self.dtype {
                GgmlDType::Q4_0 => BlockQ4_0::to_float(as_blocks(row)?, dst),
                GgmlDType::Q4K => BlockQ4K::to_float(as_blocks(row)?, dst),
                GgmlDType::Q5K => BlockQ5K::to_float(as_blocks(row)?, dst),
                GgmlDType::Q6K => BlockQ6K::to_float(as_blocks(row)?, dst),
                GgmlDType::Q8_0 => BlockQ8_0::to_float(as_blocks(row)?, dst),
                other => bail!("no CPU kernel for {other:?}"),
            }
        }
        Ok(out)
    }

    /// `x @ w.T` for f32 `x: [m, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_as(x, RowClass::Prompt)
    }

    /// Whether `Prompt` rows take other kernels than `Rows` rows here.
    pub fn has_prompt_kernel(&self) -> bool {
        match self.dtype {
            GgmlDType::Q4_0 => q4_0_panel::Panel::available(),
            GgmlDType::Q4K => q4k_panel::Panel::available() && !self.is_repack_planned(),
            GgmlDType::Q5K => q5k_panel::Panel::available(),
            GgmlDType::Q6K => q6k_panel::Panel::available() && !self.is_repack_planned(),
            // Its decode rows take the panels' sums too (`q8_0_panel::dot_rows`
            // and `multiply_rows`): one pass over the weights for both.
            GgmlDType::Q8_0 => false,
            _ => false,
        }
    }

    /// `x @ w.T` for `x: [m, in]` through the kernels of `class`, in f32.
    pub fn forward_as(&self, x: &Tensor, class: RowClass) -> Result<Tensor> {
        let rows = match class {
            RowClass::Rows => x.dim(0)?,
            RowClass::Prompt => 0,
        };
        let [out] = Self::forward_split_each([self], x, rows)?;
        Ok(out)
    }

    /// `x @ w.T` for every matrix of `ws` (all of `x`'s width), `x: [m, in]`,
    /// with the first `rows` rows (decode rows) through the row kernels and
    /// the rest (prompt positions) through the prompt kernels, in f32: each
    /// row takes the kernels it would alone (see [`RowSplit`]). This
    /// crate's kernels quantize each part of the input once for all the
    /// matrices (q, k and v read one input; gate and up another), over the
    /// pool's threads; candle's (CPUs without AVX-512 VNNI) once per matrix.
    ///
    /// Errors when a matrix's width is not `x`'s.
    pub fn forward_split_each<const N: usize>(
        ws: [&Self; N],
        x: &Tensor,
        rows: usize,
    ) -> Result<[Tensor; N]> {
        let (m, k) = x.dims2()?;
        for w in ws {
            if k != w.cols {
                bail!("input has {k} features, the matrix {}", w.cols);
            }
        }
        super::with_f32(x, |xs| {
            // Made on first use: a part no matrix reads is never quantized.
            let at = rows.min(m) * k;
            let (all, head, tail) = (
                Activations::new(xs, k),
                Activations::new(&xs[..at], k),
                Activations::new(&xs[at..], k),
            );
            let mut outs = Vec::with_capacity(N);
            for w in ws {
                let out = match RowSplit::new(rows, m, w.has_prompt_kernel()) {
                    RowSplit::All(class) => w.product(&all, class == RowClass::Prompt, rows > 0)?,
                    RowSplit::At(_) => {
                        let mut out = w.product(&head, false, true)?;
                        out.extend_from_slice(&w.product(&tail, true, true)?);
                        out
                    }
                };
                outs.push(Tensor::from_vec(out, (m, w.rows), &Device::Cpu)?);
            }
            Ok(super::into_array(outs))
        })
    }

    /// `[m, rows]` for the `m` activation rows of `acts`, through the
    /// prompt kernels when `panels` (see `forward_split_each`).
    ///
    /// `decode` says the step has decode rows (a repacked copy that is not
    /// there yet is made then; see `matmul_repacked`).
    fn product(&self, acts: &Activations, panels: bool, decode: bool) -> Result<Vec<f32>> {
        let k = self.cols;
        if acts.rows() == 0 {
            // A panel's pass over no tokens would index an empty band.
            return Ok(Vec::new());
        }
        if let Some(repack) = self.repack.as_ref().filter(|r| r.is_planned()) {
            return self.matmul_repacked(acts, repack, decode);
        }
        Ok(match self.dtype {
            GgmlDType::Q4_0 if panels && q4_0_panel::Panel::available() => {
                self.matmul_panels::<q4_0_panel::Panel>(acts)?
            }
            GgmlDType::Q4_0 if super::q4k::have_vnni() && k.is_multiple_of(q8_0::PAIR) => {
                self.matmul_own::<Q4_0>(acts)?
            }
            GgmlDType::Q4_0 => self.matmul::<BlockQ4_0>(acts)?,
            GgmlDType::Q4K if panels && q4k_panel::Panel::available() => {
                self.matmul_panels::<q4k_panel::Panel>(acts)?
            }
            GgmlDType::Q5K if panels && q5k_panel::Panel::available() => {
                self.matmul_panels::<q5k_panel::Panel>(acts)?
            }
            GgmlDType::Q6K if panels && q6k_panel::Panel::available() => {
                self.matmul_panels::<q6k_panel::Panel>(acts)?
            }
            GgmlDType::Q8_0 if panels && q8_0_panel::Panel::available() => {
                if acts.rows() == 1 && !super::avx512_on_halves() {
                    self.q8_0_one_token(acts)?
                } else if acts.rows() < Q8_0_PACK_FROM {
                    self.by_panels::<q8_0_panel::Panel>(acts, q8_0_panel::multiply_rows)?
                } else {
                    self.matmul_panels::<q8_0_panel::Panel>(acts)?
                }
            }
            GgmlDType::Q4K if super::q4k::have_vnni() => self.matmul_own::<Q4K>(acts)?,
            GgmlDType::Q5K if super::q4k::have_vnni() => self.matmul_own::<Q5K>(acts)?,
            GgmlDType::Q6K if super::q4k::have_vnni() => self.matmul_own::<Q6K>(acts)?,
            GgmlDType::Q4K => self.matmul::<BlockQ4K>(acts)?,
            GgmlDType::Q5K => self.matmul::<BlockQ5K>(acts)?,
            GgmlDType::Q6K => self.matmul::<BlockQ6K>(acts)?,
            GgmlDType::Q8_0 => self.matmul::<BlockQ8_0>(acts)?,
            other => bail!("no CPU kernel for {other:?}"),
        })
    }

    /// candle's row kernels (CPUs without AVX-512 VNNI).
    fn matmul<T: GgmlType>(&self, acts: &Activations) -> Result<Vec<f32>> {
        let (n, k, m, xs) = (self.rows, self.cols, acts.rows(), acts.xs);
        let blocks = as_blocks::<T>(&self.data)?;
        let kb = k / T::BLCK_SIZE;
        if blocks.len() != n * kb {
            bail!(
                "quantized data holds {} blocks, expected {}",
                blocks.len(),
                n * kb
            );
        }
        // The activations, quantized for this product alone (candle's kernels pair
        // with their own units, which `Activations` does not keep).
        let kq = k / T::VecDotType::BLCK_SIZE;
        let mut xq = vec![T::VecDotType::zeros(); m * kq];
        for (row, dst) in xs.chunks_exact(k).zip(xq.chunks_exact_mut(kq)) {
            T::VecDotType::from_float(row, dst);
        }
        Ok(rows_by_tasks(self.rows, m, kq, &xq, |r, x| {
            T::vec_dot(k, &blocks[r * kb..(r + 1) * kb], x)
        }))
    }
}

impl QuantMatrix {
    /// The matrix's bytes, checked to be `rows` rows of `row_bytes` each
    /// (`new` checked it for the format; this guards a kernel's constants).
    fn row_data(&self, row_bytes: usize) -> Result<&[u8]> {
        if self.data.len() != self.rows * row_bytes {
            bail!(
                "quantized data holds {} bytes, expected {}",
                self.data.len(),
                self.rows * row_bytes
            );
        }
        Ok(&self.data)
    }

    /// A format with a kernel in this crate (`q4k`, `q8_0`).
    fn matmul_own<K: Kernel>(&self, acts: &Activations) -> Result<Vec<f32>> {
        let (n, k, m) = (self.rows, self.cols, acts.rows());
        let row_bytes = k / K::BLOCK_VALUES * K::BLOCK_BYTES;
        let data = self.row_data(row_bytes)?;
        let per_row = k / K::X::VALUES;
        let xq = acts.get::<K::X>();
        let row = |r: usize| &data[r * row_bytes..(r + 1) * row_bytes];
        if m == 1 {
            let out = rows_in_pairs(
                n,
                |r| K::dot(row(r), xq),
                |a, b| K::dot2([row(a), row(b)], xq),
            );
            return Ok(out);
        }
        let xs: Vec<&[K::X]> = xq.chunks_exact(per_row).collect();
        let kernel = Rows::<K> {
            data,
            row_bytes,
            kernel: std::marker::PhantomData,
        };
        Ok(in_tiles(n, &xs, &kernel))
    }
}

/// A quantized matrix's rows through kernel `K`.
struct Rows<'a, K> {
    data: &'a [u8],
    row_bytes: usize,
    kernel: std::marker::PhantomData<fn() -> K>,
}

impl<K: Kernel> Rows<'_, K> {
    /// Bytes of weights per activation unit (`K::X`: one Q8_K block, or a
    /// pair of Q8_0 blocks).
    const UNIT_BYTES: usize = K::X::VALUES / K::BLOCK_VALUES * K::BLOCK_BYTES;
}

impl<K: Kernel> RowDot for Rows<'_, K> {
    type X = [K::X];
    fn dot_n<const N: usize>(&self, r: usize, xs: [&[K::X]; N]) -> [f32; N] {
        K::dot_n(&self.data[r * self.row_bytes..(r + 1) * self.row_bytes], xs)
    }

    fn spans<const N: usize>(&self) -> Option<(usize, usize)> {
        let units = self.row_bytes / Self::UNIT_BYTES;
        let unit = N * std::mem::size_of::<K::X>();
        let span = (SPAN_BYTES / unit).max(1);
        // Every kernel's `dot_n_lanes` is its VNNI kernel.
        (units * unit > SPANS_FROM && q4k::have_vnni()).then_some((units, span))
    }

    fn prefetch(&self, r: usize, span: std::ops::Range<usize>) {
        let at = r * self.row_bytes;
        let Some(bytes) = self
            .data
            .get(at + span.start * Self::UNIT_BYTES..at + span.end * Self::UNIT_BYTES)
        else {
            return;
        };
        #[cfg(target_arch = "x86_64")]
        for line in bytes.chunks(64) {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            // SAFETY: a prefetch of memory inside `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = bytes;
    }

    fn dot_n_lanes<const N: usize>(
        &self,
        r: usize,
        xs: [&[K::X]; N],
        span: std::ops::Range<usize>,
        lanes: &mut [Lanes; N],
    ) {
        let at = r * self.row_bytes;
        let row = &self.data[at + span.start * Self::UNIT_BYTES..at + span.end * Self::UNIT_BYTES];
        let done = K::dot_n_lanes(row, xs.map(|x| &x[span.clone()]), lanes);
        assert!(done, "spans of a row without the kernel that carries lanes");
    }
}

impl QuantMatrix {
    /// Prompts through a panel kernel: each task's band of rows is unpacked
    /// sixteen rows at a time into a per-thread panel (reused, so no
    /// allocation per band), and every token passes over it; rows past the
    /// last whole panel take the kernel's row dot product.
    fn matmul_panels<P: PanelKernel>(&self, acts: &Activations) -> Result<Vec<f32>> {
        self.by_panels::<P>(acts, |rows, row_bytes, xs, out, stride| {
            P::with_panel(|panel| {
                panel.pack(rows, row_bytes);
                panel.multiply(xs, out, stride);
            })
        })
    }

    /// Every row through the panels' sums, for a Q4_K or Q6_K matrix
    /// whose repacked copy is planned (`repack`): from the copy once it is
    /// made (a few tokens through its `multiply`, many through the panel's
    /// `pack_repacked` and `multiply`), from the rows as stored before that
    /// (`pack`); all three give the same bits. A step with `decode` rows
    /// makes the copy first if it is missing. Rows past the last whole
    /// group take the row kernel.
    fn matmul_repacked(
        &self,
        acts: &Activations,
        repack: &Repack,
        decode: bool,
    ) -> Result<Vec<f32>> {
        use super::repack::RepackedCopy;
        use q4k_panel::ROWS;
        let (n, k, m) = (self.rows, self.cols, acts.rows());
        let row_bytes = k / self.dtype.block_size() * self.dtype.type_size();
        let data = self.row_data(row_bytes)?;
        let xq = acts.get::<Q8K>();
        let xs: Vec<&[Q8K]> = xq.chunks_exact(k / q4k::QK).collect();
        if decode {
            repack.make(true, false);
        }
        let copy = repack.copy();
        let q4k = match self.dtype {
            GgmlDType::Q4K => true,
            GgmlDType::Q6K => false,
            other => unreachable!("no repacked copy for {other:?}"),
        };
        let dot = if q4k { q4k::dot } else { q6k::dot };
        Ok(bands(n, m, |rows, band, width| {
            let mut r = rows.start;
            while r + ROWS <= rows.end {
                let (g, out) = (r / ROWS, &mut band[r - rows.start..]);
                let few = m < REPACKED_PACK_FROM;
                match copy {
                    Some(RepackedCopy::Q4K(copy)) if few => copy.multiply(g, &xs, out, width),
                    Some(RepackedCopy::Q6K(copy)) if few => copy.multiply(g, &xs, out, width),
                    Some(RepackedCopy::Q4K(copy)) => q4k_panel::Panel::with_panel(|panel| {
                        panel.pack_repacked(copy, g);
                        panel.multiply(&xs, out, width);
                    }),
                    Some(RepackedCopy::Q6K(copy)) => q6k_panel::Panel::with_panel(|panel| {
                        panel.pack_repacked(copy, g);
                        panel.multiply(&xs, out, width);
                    }),
                    None if q4k => q4k_panel::Panel::with_panel(|panel| {
                        panel.pack(&data[r * row_bytes..], row_bytes);
                        panel.multiply(&xs, out, width);
                    }),
                    None => q6k_panel::Panel::with_panel(|panel| {
                        panel.pack(&data[r * row_bytes..], row_bytes);
                        panel.multiply(&xs, out, width);
                    }),
                }
                r += ROWS;
            }
            for row in r..rows.end {
                let w = &data[row * row_bytes..(row + 1) * row_bytes];
                for (t, x) in xs.iter().enumerate() {
                    band[t * width + row - rows.start] = dot(w, x);
                }
            }
        }))
    }

    /// The repacked copy this matrix may get (Q4_K or Q6_K on a CPU with
    /// the panels' instructions): what the move of the weights plans and makes.
    pub fn repack(&self) -> Option<&std::sync::Arc<Repack>> {
        self.repack.as_ref()
    }

    fn is_repack_planned(&self) -> bool {
        self.repack.as_ref().is_some_and(|r| r.is_planned())
    }

    /// One token through Q8_0 rows, two streams a thread
    /// (`q8_0_panel::dot_rows`): the panels' bits at the row kernels' pace.
    ///
    /// Where AVX-512 runs on 256-bit halves (`super::avx512_on_halves`: Zen
    /// 4) one token takes `multiply_rows` instead, which gives the same
    /// bits (its test): `dot_rows` is bound by its instructions, and there
    /// they cost twice. Measured on a Zen 4 EPYC, 7B Q8_0, one stream, tg32
    /// interleaved: `dot_rows` 3.48 / 3.61 / 3.32 tok/s, `multiply_rows`
    /// 4.14 / 4.57 / 4.88 (llama.cpp 3.78 in the same sitting's race). On
    /// the Zen 5 EPYC where `dot_rows` was chosen it ran at 8.7–9.0.
    fn q8_0_one_token(&self, acts: &Activations) -> Result<Vec<f32>> {
        let row_bytes = self.cols / q8_0_panel::QK * q8_0::BLOCK_BYTES;
        let data = self.row_data(row_bytes)?;
        let x = acts.get::<Q8Sum>();
        let scales = acts.q8_scales.get_or_init(|| q8_0_panel::Scales::new(x));
        let row = |r: usize| &data[r * row_bytes..(r + 1) * row_bytes];
        Ok(rows_in_pairs(
            self.rows,
            |r| q8_0_panel::dot_rows([row(r)], x, scales)[0],
            |a, b| q8_0_panel::dot_rows([row(a), row(b)], x, scales),
        ))
    }

    /// The product sixteen rows at a time through `group(rows, row_bytes,
    /// tokens, out, stride)` (what a panel's `pack` then `multiply` do), in
    /// a band of rows per task; rows past the last whole sixteen take the
    /// panel kernel's row dot product.
    fn by_panels<P: PanelKernel>(
        &self,
        acts: &Activations,
        group: impl Fn(&[u8], usize, &[&[P::X]], &mut [f32], usize) + Sync,
    ) -> Result<Vec<f32>> {
        let (n, k, m) = (self.rows, self.cols, acts.rows());
        let row_bytes = k / P::BLOCK_VALUES * P::BLOCK_BYTES;
        let data = self.row_data(row_bytes)?;
        let per_row = k / P::X::VALUES;
        let xq = acts.get::<P::X>();
        let xs: Vec<&[P::X]> = xq.chunks_exact(per_row).collect();
        Ok(bands(n, m, |rows, band, width| {
            let mut r = rows.start;
            while r + q4k_panel::ROWS <= rows.end {
                group(
                    &data[r * row_bytes..],
                    row_bytes,
                    &xs,
                    &mut band[r - rows.start..],
                    width,
                );
                r += q4k_panel::ROWS;
            }
            for row in r..rows.end {
                let w = &data[row * row_bytes..(row + 1) * row_bytes];
                for (t, x) in xs.iter().enumerate() {
                    band[t * width + row - rows.start] = P::dot(w, x);
                }
            }
        }))
    }
}

/// Tokens from which a Q8_0 product packs panels rather than transposing
/// each block's sixteen rows in registers once per eight tokens
/// (`q8_0_panel::multiply_rows`); both give the same bits. In rows × GB of
/// weights per second on in-cache weights (kernels bench, `--rows M`),
/// packed against in registers: 4 rows 119 / 333, 8: 197 / 464, 16: 158 /
/// 481, 32: 207 / 483, 64: 427 / 451, 128: 479 / 478.
const Q8_0_PACK_FROM: usize = 128;

/// Tokens from which a repacked Q4_K or Q6_K product unpacks each group
/// into a panel (`pack_repacked`, about 4.3 ns per row-block on a Zen 4)
/// rather than in registers for every four tokens (`Repacked::multiply`,
/// 1.67 ns per row-block and token against the panel's 1.47): the same
/// bits. Measured on Q4_K; Q6_K's 9-31 tokens unpack a block once per
/// eight, not measured against the panel.
const REPACKED_PACK_FROM: usize = 32;

/// What `matmul_panels` needs of a panel kernel (`q4_0_panel`, `q4k_panel`,
/// `q5k_panel`, `q6k_panel`, `q8_0_panel`).
pub(super) trait PanelKernel: Sized {
    /// The activations' quantized unit: one per weight block.
    type X: Quantized;
    const BLOCK_VALUES: usize;
    const BLOCK_BYTES: usize;
    /// Runs `f` on this thread's panel (a static cannot be generic, so each
    /// kernel keeps its own).
    fn with_panel(f: impl FnOnce(&mut Self));
    fn pack(&mut self, rows: &[u8], row_bytes: usize);
    fn multiply(&self, xs: &[&[Self::X]], out: &mut [f32], stride: usize);
    fn dot(row: &[u8], x: &[Self::X]) -> f32;
}

/// The `PanelKernel` of a panel module: the activations' type (Q8_K for
/// the k-quants, `Q8Sum` for Q8_0 and Q4_0), their block's values, the
/// format's block bytes, and the row dot product that rows
/// outside a whole panel take.
macro_rules! panel_kernel {
    ($panel:ident, $x:ty, $values:expr, $bytes:expr, $dot:path) => {
        impl PanelKernel for $panel::Panel {
            type X = $x;
            const BLOCK_VALUES: usize = $values;
            const BLOCK_BYTES: usize = $bytes;
            fn with_panel(f: impl FnOnce(&mut Self)) {
                thread_local! {
                    static PANEL: std::cell::RefCell<$panel::Panel> = Default::default();
                }
                PANEL.with_borrow_mut(f)
            }
            fn pack(&mut self, rows: &[u8], row_bytes: usize) {
                $panel::Panel::pack(self, rows, row_bytes)
            }
            fn multiply(&self, xs: &[&[Self::X]], out: &mut [f32], stride: usize) {
                $panel::Panel::multiply(self, xs, out, stride)
            }
            fn dot(row: &[u8], x: &[Self::X]) -> f32 {
                $dot(row, x)
            }
        }
    };
}

use q4k::Q8K;
use q8_0_panel::Q8Sum;
panel_kernel!(q4k_panel, Q8K, q4k::QK, q4k::BLOCK_BYTES, q4k::dot);
panel_kernel!(q5k_panel, Q8K, q4k::QK, q5k::BLOCK_BYTES, q5k::dot);
panel_kernel!(q6k_panel, Q8K, q4k::QK, q6k::BLOCK_BYTES, q6k::dot);
panel_kernel!(
    q8_0_panel,
    Q8Sum,
    q8_0_panel::QK,
    q8_0::BLOCK_BYTES,
    q8_0_panel::dot_scalar
);
panel_kernel!(
    q4_0_panel,
    Q8Sum,
    q8_0_panel::QK,
    q4_0::BLOCK_BYTES,
    q4_0_panel::dot_scalar
);

/// What every panel (`q4_0_panel`, `q4k_panel`, `q5k_panel`, `q6k_panel`,
/// `q8_0_panel`) is held to, on `cols` values per row, sixteen rows that
/// start at row 3 of 19, and 7 tokens (a group of four, three single ones):
/// - on rows quantized from fixed values (`test_values`), the scalar
///   reference `scalar` is the dequantized product up to the activations'
///   8-bit rounding (2% of the products' magnitudes), and `multiply` is
///   `scalar` to 1e-4 of the result (at least 1);
/// - on blocks of extreme bytes (`extreme(i, block)` fills block `i`),
///   `multiply` is `scalar` to the same bound, also for tokens of all +1
///   and all −1 (activations of ±127: the largest integer sums);
/// - it writes nothing past its sixteen rows.
#[cfg(test)]
pub(super) fn check_panel<P: PanelKernel>(
    dtype: GgmlDType,
    cols: usize,
    extreme: impl Fn(usize, &mut [u8]),
    scalar: fn(&[u8], &[P::X]) -> f32,
) {
    use super::q4k_panel::ROWS;
    let (rows, tokens, stride) = (ROWS + 3, 7, ROWS + 5);
    let dev = Device::Cpu;
    let w = Tensor::from_vec(super::test_values(rows * cols, 11), (rows, cols), &dev).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let random = q.data().unwrap().into_owned();
    let deq: Vec<f32> = q
        .dequantize(&dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let row_bytes = cols / P::BLOCK_VALUES * P::BLOCK_BYTES;
    assert_eq!(random.len(), rows * row_bytes);
    let mut extremes = vec![0u8; rows * row_bytes];
    for (i, block) in extremes.chunks_exact_mut(P::BLOCK_BYTES).enumerate() {
        extreme(i, block);
    }
    let mut x = super::test_values(tokens * cols, 12);
    x[..cols].fill(1.0);
    x[cols..2 * cols].fill(-1.0);
    let per_row = cols / P::BLOCK_VALUES;
    let xq = quantize_tokens::<P::X>(&x);
    let xs: Vec<&[P::X]> = xq.chunks_exact(per_row).collect();
    for (r, w) in deq.chunks_exact(cols).enumerate().take(4) {
        let row = &random[r * row_bytes..(r + 1) * row_bytes];
        for (t, x) in x.chunks_exact(cols).enumerate().skip(2) {
            let exact: f32 = w.iter().zip(x).map(|(a, b)| a * b).sum();
            let scale: f32 = w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
            let got = scalar(row, xs[t]);
            assert!(
                (got - exact).abs() < 0.02 * scale,
                "{dtype:?}: {got} vs {exact}"
            );
        }
    }
    if !super::q4k::have_vnni() {
        eprintln!("no AVX-512 VNNI on this CPU: no panel to compare");
        return;
    }
    // Tokens 0 and 1 against the random rows would sum ±Σw, a near-total
    // cancellation of terms hundreds of times larger than the result, where
    // the panel's and the scalar kernel's float orders alone differ by more
    // than the bound (a Q5_K test failed so about once in 40 runs): they are
    // held to it on the extreme rows, whose values do not cancel.
    for (bytes, first) in [(&random, 2), (&extremes, 0)] {
        let mut out = vec![f32::NAN; tokens * stride];
        P::with_panel(|panel| {
            panel.pack(&bytes[3 * row_bytes..], row_bytes);
            panel.multiply(&xs, &mut out, stride);
        });
        for (t, x) in xs.iter().enumerate() {
            assert!(
                out[t * stride + ROWS].is_nan(),
                "wrote past the panel's rows"
            );
            if t < first {
                continue;
            }
            for r in 0..ROWS {
                let row = &bytes[(3 + r) * row_bytes..(4 + r) * row_bytes];
                let want = scalar(row, x);
                let got = out[t * stride + r];
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{dtype:?} token {t} row {r}: {got} vs {want}"
                );
            }
        }
    }
}

/// The input of one or more products, `[m, k]` in f32, and its quantized
/// forms, each made on first use and kept: the matrices that read one
/// input (q, k and v; gate and up) quantize it once between them.
pub(super) struct Activations<'a> {
    xs: &'a [f32],
    k: usize,
    q8k: std::cell::OnceCell<Vec<Q8K>>,
    q8_pair: std::cell::OnceCell<Vec<q8_0::Q8Pair>>,
    q8_sum: std::cell::OnceCell<Vec<Q8Sum>>,
    /// One token's `Q8Sum` scales apart (`q8_0_panel::dot_rows`), made
    /// once for the products that share the input.
    q8_scales: std::cell::OnceCell<q8_0_panel::Scales>,
}

impl<'a> Activations<'a> {
    /// `xs` holds whole rows of `k` values.
    fn new(xs: &'a [f32], k: usize) -> Self {
        debug_assert!(k > 0 && xs.len().is_multiple_of(k));
        Self {
            xs,
            k,
            q8k: Default::default(),
            q8_pair: Default::default(),
            q8_sum: Default::default(),
            q8_scales: Default::default(),
        }
    }

    fn rows(&self) -> usize {
        self.xs.len() / self.k
    }

    /// Every row quantized to `X`, row after row (`k / X::VALUES` units
    /// each). `k` is a multiple of `X::VALUES` wherever a kernel pairs with
    /// `X` (`QuantMatrix::new` and `product` check the widths), so no unit
    /// straddles two rows.
    fn get<X: Quantized>(&self) -> &[X] {
        debug_assert!(self.k.is_multiple_of(X::VALUES));
        X::cell(self).get_or_init(|| quantize_tokens(self.xs))
    }
}

/// An activation unit the kernels pair with: Q8_K (the k-quants), Q8_0
/// pairs (Q4_0's row kernels), `Q8Sum` (Q8_0's kernels and Q4_0's panels).
pub(super) trait Quantized: Clone + Send + Sync + Sized {
    /// f32 values per unit.
    const VALUES: usize;
    fn zeros() -> Self;
    /// `x` (a multiple of `VALUES` values) into `out`, unit by unit.
    fn quantize(x: &[f32], out: &mut [Self]);
    /// Where `Activations` keeps this form.
    fn cell<'b>(acts: &'b Activations) -> &'b std::cell::OnceCell<Vec<Self>>;
}

macro_rules! quantized {
    ($x:ty, $values:expr, $quantize:path, $cell:ident) => {
        impl Quantized for $x {
            const VALUES: usize = $values;
            fn zeros() -> Self {
                <$x>::zeros()
            }
            fn quantize(x: &[f32], out: &mut [Self]) {
                $quantize(x, out)
            }
            fn cell<'b>(acts: &'b Activations) -> &'b std::cell::OnceCell<Vec<Self>> {
                &acts.$cell
            }
        }
    };
}
quantized!(Q8K, q4k::QK, q4k::quantize_q8k, q8k);
quantized!(q8_0::Q8Pair, q8_0::PAIR, q8_0::quantize, q8_pair);
quantized!(Q8Sum, q8_0_panel::QK, q8_0_panel::quantize, q8_sum);

/// Values a quantizing task takes at least: fewer cost less than handing
/// them to the other threads (a decode row of 4096 stays on the caller).
const QUANTIZE_PER_TASK: usize = 8192;

/// `xs` quantized into units of `X`, in tasks over the thread pool when it
/// is long (a batch's rows, a prompt chunk): the caller quantizing alone
/// while the others waited was 8% of a step at eight sequences. Units are
/// independent, so the split does not change a byte.
fn quantize_tokens<X: Quantized>(xs: &[f32]) -> Vec<X> {
    let mut xq = vec![X::zeros(); xs.len() / X::VALUES];
    let per_task = QUANTIZE_PER_TASK.div_ceil(X::VALUES);
    if xq.len() <= per_task {
        X::quantize(xs, &mut xq);
    } else {
        pool::for_each_chunk_mut(&mut xq, per_task, |task, dst| {
            let start = task * per_task * X::VALUES;
            X::quantize(&xs[start..start + dst.len() * X::VALUES], dst)
        });
    }
    xq
}

/// Generation's `[1, n]` product: each task's rows in pairs, row `i` of its
/// first half with row `i` of its second (`dot2(a, b)`), so each thread
/// reads two in-order streams at once; an odd row out takes `dot`. Paired
/// adjacent rows halved the streamed rate (the prefetchers lose the
/// pattern); two distant streams keep more reads in flight than one.
pub(super) fn rows_in_pairs(
    n: usize,
    dot: impl Fn(usize) -> f32 + Sync,
    dot2: impl Fn(usize, usize) -> [f32; 2] + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; n];
    pool::for_each_chunk_mut(&mut out, ROWS_PER_TASK, |task, dst| {
        let r0 = task * ROWS_PER_TASK;
        let half = dst.len() / 2;
        for i in 0..half {
            let [a, b] = dot2(r0 + i, r0 + half + i);
            dst[i] = a;
            dst[half + i] = b;
        }
        if dst.len() % 2 == 1 {
            dst[2 * half] = dot(r0 + 2 * half);
        }
    });
    out
}

/// `out[i, r] = dot(r, activations of row i)`, weight rows split over
/// the thread pool in bands (each band stays in cache while every
/// activation row passes over it).
pub(super) fn rows_by_tasks<X: Sync>(
    n: usize,
    m: usize,
    per_row: usize,
    xq: &[X],
    dot: impl Fn(usize, &[X]) -> f32 + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    if m == 1 {
        pool::for_each_chunk_mut(&mut out, ROWS_PER_TASK, |task, dst| {
            let r0 = task * ROWS_PER_TASK;
            for (i, o) in dst.iter_mut().enumerate() {
                *o = dot(r0 + i, xq);
            }
        });
        return out;
    }
    bands(n, m, |rows, band, width| {
        for (i, x) in xq.chunks_exact(per_row).enumerate() {
            for r in rows.clone() {
                band[i * width + r - rows.start] = dot(r, x);
            }
        }
    })
}

/// The `[m, rows]` output computed in bands of weight rows, one band per
/// task (it stays in cache while the activation rows pass over it):
/// `fill(rows, band, width)` writes the output of weight row `r` for
/// activation row `i` at `band[i * width + r - rows.start]`.
///
/// Each thread fills one reused band buffer and copies it into its columns
/// of the output at once, so a product holds its output once: a prompt
/// step of 1024 rows through a 14336-row FFN matrix no longer holds a
/// second 59 MB copy of it in per-task bands until every task is done.
pub(super) fn bands(
    n: usize,
    m: usize,
    fill: impl Fn(std::ops::Range<usize>, &mut [f32], usize) + Sync,
) -> Vec<f32> {
    thread_local! {
        static BAND: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut out = vec![0f32; m * n];
    let base = pool::SendPtr(out.as_mut_ptr());
    pool::run(n.div_ceil(ROWS_PER_TASK), &|task| {
        let r0 = task * ROWS_PER_TASK;
        let r1 = (r0 + ROWS_PER_TASK).min(n);
        let width = r1 - r0;
        BAND.with_borrow_mut(|band| {
            band.clear();
            band.resize(m * width, 0.0);
            fill(r0..r1, band, width);
            for (i, src) in band.chunks_exact(width).enumerate() {
                // SAFETY: task `task` runs once and alone writes columns
                // r0..r1 of the `[m, n]` output (i < m, r1 <= n), which
                // `out` holds and outlives `run`; no reference to `out`
                // exists meanwhile, so the writes go through the pointer.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), base.get().add(i * n + r0), width)
                };
            }
            // A band of a very large step is not kept for the thread's life.
            if band.capacity() > BAND_KEEP {
                *band = Vec::new();
            }
        });
    });
    out
}

/// Largest band (f32s) a thread keeps between products: 4 MB, a band of
/// 64 rows for 16384 activation rows.
const BAND_KEEP: usize = 1 << 20;

/// A matrix's row kernel, `N` tokens at a time: row `r` times `N` tokens'
/// activations, each weight block unpacked once for all of them.
pub(super) trait RowDot: Sync {
    type X: ?Sized + Sync;
    fn dot_n<const N: usize>(&self, r: usize, xs: [&Self::X; N]) -> [f32; N];

    /// `(units, span)` when `N` tokens' activations for a whole row (of
    /// `units` activation units) would not stay in L1 and the kernel can
    /// take the row in spans of `span` units (`dot_n_lanes`); `None` to
    /// take rows whole.
    fn spans<const N: usize>(&self) -> Option<(usize, usize)> {
        None
    }

    /// Asks for the weights of units `span` of row `r` to be brought into cache.
    fn prefetch(&self, _r: usize, _span: std::ops::Range<usize>) {}

    /// `dot_n` over the activation units `span` of row `r`, continuing
    /// each token's accumulator lanes. Only called when `spans` said so.
    fn dot_n_lanes<const N: usize>(
        &self,
        _r: usize,
        _xs: [&Self::X; N],
        _span: std::ops::Range<usize>,
        _lanes: &mut [Lanes; N],
    ) {
        unreachable!("spans() is None: rows are taken whole")
    }
}

/// Activation bytes a tile's span of a row may take (`RowDot::spans`): a
/// third of L1 is left to the weights and the carried lanes.
const SPAN_BYTES: usize = 32 << 10;

/// Activation bytes of a tile's row past which it is taken in spans: this
/// EPYC's L1 (on a CPU with 32 KiB of L1 a little more spills than here).
const SPANS_FROM: usize = 48 << 10;

/// Weight rows whose lanes a span pass carries (`tile_in_spans`): 8 KiB of
/// lanes for eight tokens.
const SPAN_ROWS: usize = 16;

/// How many (row, span) steps ahead `tile_in_spans` prefetches weights.
const SPAN_AHEAD: usize = 2;

/// The `[m, n]` product for several rows (m > 1): eight activation rows per
/// pass over each weight row, then four, then the 1 to 3 left in one pass,
/// each band of weight rows (in L2) swept once per tile of activation rows
/// (in L1; rows too wide for that in spans). Every kernel sums an output in
/// the same order, so the tiling does not change a row's result.
pub(super) fn in_tiles<D: RowDot>(n: usize, xs: &[&D::X], kernel: &D) -> Vec<f32> {
    fn tile<D: RowDot, const N: usize>(
        kernel: &D,
        xs: &[&D::X],
        i: usize,
        rows: std::ops::Range<usize>,
        band: &mut [f32],
        width: usize,
    ) {
        let tile: [&D::X; N] = std::array::from_fn(|t| xs[i + t]);
        if let Some((units, span)) = kernel.spans::<N>() {
            return tile_in_spans(kernel, tile, i, rows, band, width, units, span);
        }
        for r in rows.clone() {
            for (t, v) in kernel.dot_n(r, tile).into_iter().enumerate() {
                band[(i + t) * width + r - rows.start] = v;
            }
        }
    }
    /// `tile` for rows too wide for their activations to stay in L1: for
    /// `SPAN_ROWS` weight rows at a time, each span of the activations is
    /// read once from L2 for all of them, and each row's lanes carried from
    /// span to span, so the result has the bits of the row taken whole.
    /// (Eight tokens of a 14336-wide Q4_K row are 143 KB of Q8_K
    /// activations, and each of the band's rows re-read them from L2: 8.1
    /// cycles per block and token against 6.6 for 4096-wide rows.)
    ///
    /// Measured on a 7B's decode steps of eight sequences, interleaved with
    /// the whole-row binary: Q4_K_M 33.85–34.79 → 34.77–34.97 tok/s (four
    /// rounds), Q8_0 20.04–20.42 → 20.75–21.28 (three); the 14336-wide
    /// Q4_K product alone (kernels bench, streamed) 109–111 → 126–130
    /// rows·GB/s (Q8_0 then took four tokens a pass, and only its 14336-wide
    /// rows went in spans). A first cut (32 KiB spans for 4096-wide Q4_K
    /// rows too, the kernels' prefetch left on, none here) was 12–15% slower
    /// than whole rows.
    #[allow(clippy::too_many_arguments)]
    fn tile_in_spans<D: RowDot, const N: usize>(
        kernel: &D,
        tile: [&D::X; N],
        i: usize,
        rows: std::ops::Range<usize>,
        band: &mut [f32],
        width: usize,
        units: usize,
        span: usize,
    ) {
        let mut lanes = [[[0f32; 16]; N]; SPAN_ROWS];
        for first in rows.clone().step_by(SPAN_ROWS) {
            let group = first..(first + SPAN_ROWS).min(rows.end);
            lanes.iter_mut().for_each(|l| *l = [[0f32; 16]; N]);
            for start in (0..units).step_by(span) {
                let this = start..(start + span).min(units);
                for (r, lanes) in group.clone().zip(&mut lanes) {
                    // The kernels' own prefetch is off here (it runs ahead
                    // within a row, into spans taken much later): the
                    // (row, span) `SPAN_AHEAD` steps on is asked for instead.
                    // (Running on into the next group's first steps, and
                    // from each span's first cache line rather than its
                    // first byte, measured slower: eight Q8_0 decode rows
                    // at 17.0–17.6 tok/s against 21.9–22.5, two rounds.)
                    let k = r - group.start + SPAN_AHEAD;
                    let next = start + k / group.len() * span;
                    if next < units {
                        let row = group.start + k % group.len();
                        kernel.prefetch(row, next..(next + span).min(units));
                    }
                    kernel.dot_n_lanes(r, tile, this.clone(), lanes);
                }
            }
            for (r, lanes) in group.zip(&lanes) {
                for (t, lanes) in lanes.iter().enumerate() {
                    band[(i + t) * width + r - rows.start] = super::reduce_lanes(lanes);
                }
            }
        }
    }
    let m = xs.len();
    bands(n, m, |rows, band, width| {
        let mut i = 0;
        while i + 8 <= m {
            tile::<D, 8>(kernel, xs, i, rows.clone(), band, width);
            i += 8;
        }
        while i + 4 <= m {
            tile::<D, 4>(kernel, xs, i, rows.clone(), band, width);
            i += 4;
        }
        match m - i {
            3 => tile::<D, 3>(kernel, xs, i, rows, band, width),
            2 => tile::<D, 2>(kernel, xs, i, rows, band, width),
            1 => tile::<D, 1>(kernel, xs, i, rows, band, width),
            _ => {}
        }
    })
}

/// What `matmul_own` needs of one of this crate's kernels.
trait Kernel {
    /// The activations' quantized unit.
    type X: Quantized;
    const BLOCK_BYTES: usize;
    const BLOCK_VALUES: usize;
    fn dot(row: &[u8], x: &[Self::X]) -> f32;
    fn dot_n<const N: usize>(row: &[u8], xs: [&[Self::X]; N]) -> [f32; N];
    /// `dot_n` continuing each token's accumulator lanes; false, and nothing
    /// done, where the CPU lacks the kernel (VNNI).
    fn dot_n_lanes<const N: usize>(row: &[u8], xs: [&[Self::X]; N], lanes: &mut [Lanes; N])
    -> bool;
    /// Two rows times one token's activations (generation); a kernel with
    /// a two-row loop overrides this.
    fn dot2(rows: [&[u8]; 2], x: &[Self::X]) -> [f32; 2] {
        rows.map(|row| Self::dot(row, x))
    }
}

/// A format's `Kernel`: the module with its `BLOCK_BYTES`, `dot` and
/// `dot_n`, and the activations it pairs with: Q8_K (shared by the
/// k-quants) or Q8_0 pairs (Q4_0's), and its block's values.
macro_rules! kernel {
    ($name:ident, $module:ident, q8k $(, $dot2:ident)?) => {
        kernel!($name, $module, q4k::Q8K, q4k::QK $(, $dot2)?);
    };
    ($name:ident, $module:ident, q8_pair $(, $dot2:ident)?) => {
        kernel!($name, $module, q8_0::Q8Pair, 32 $(, $dot2)?);
    };
    ($name:ident, $module:ident, $x:ty, $block_values:expr $(, $dot2:ident)?) => {
        struct $name;

        impl Kernel for $name {
            type X = $x;
            const BLOCK_BYTES: usize = $module::BLOCK_BYTES;
            const BLOCK_VALUES: usize = $block_values;
            fn dot(row: &[u8], x: &[Self::X]) -> f32 {
                $module::dot(row, x)
            }
            fn dot_n<const N: usize>(row: &[u8], xs: [&[Self::X]; N]) -> [f32; N] {
                $module::dot_n(row, xs)
            }
            fn dot_n_lanes<const N: usize>(
                row: &[u8],
                xs: [&[Self::X]; N],
                lanes: &mut [Lanes; N],
            ) -> bool {
                $module::dot_n_lanes(row, xs, lanes)
            }
            $(
                fn $dot2(rows: [&[u8]; 2], x: &[Self::X]) -> [f32; 2] {
                    $module::$dot2(rows, x)
                }
            )?
        }
    };
}

kernel!(Q4K, q4k, q8k, dot2);
kernel!(Q5K, q5k, q8k, dot2);
kernel!(Q6K, q6k, q8k);
kernel!(Q4_0, q4_0, q8_pair, dot2);

/// Bytes as ggml blocks; `QuantMatrix::new` aligned them, and the check
/// stays so a misuse is an error rather than undefined behaviour.
fn as_blocks<T: GgmlType>(bytes: &[u8]) -> Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        bail!("quantized data is not a whole number of aligned blocks");
    }
    // SAFETY: length and alignment are checked above; ggml blocks are plain
    // integers and halves, valid for any bit pattern.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Module};

    /// Every format with kernels here.
    const FORMATS: [GgmlDType; 5] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q8_0,
    ];

    /// A product's values as bits, for bitwise comparisons.
    fn bits(t: Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// Against candle's `QMatMul` on fixed inputs (`test_values`). Both
    /// quantize the activations to 8 bits, but candle's x86 path rounds them
    /// its own way: over 200 random draws its results sat up to 1.3e-3 (of
    /// the largest output) from ours, for the row kernels and the panels
    /// alike (which agree with each other to 5e-7), so random inputs made a
    /// 1e-3 bound fail about once in forty runs. A wrong value or scale in a
    /// kernel moves results by far more than 5e-3.
    #[test]
    fn matches_candles_qmatmul_for_every_format_and_batch() {
        let dev = Device::Cpu;
        let values = |n: usize, seed: u64| super::super::test_values(n, seed);
        let w = Tensor::from_vec(values(201 * 512, 1), (201, 512), &dev).unwrap();
        for dtype in FORMATS {
            let q = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let ours = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let theirs = candle_core::quantized::QMatMul::from_arc(q).unwrap();
            for (m, class) in [1, 3, 70]
                .into_iter()
                .flat_map(|m| [RowClass::Rows, RowClass::Prompt].map(|c| (m, c)))
            {
                let x = Tensor::from_vec(values(m * 512, 2 + m as u64), (m, 512), &dev).unwrap();
                let a = ours.forward_as(&x, class).unwrap();
                let b = theirs.forward(&x).unwrap();
                let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
                let scale = b.abs().unwrap().max_all().unwrap();
                let rel = diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
                assert!(
                    rel < 5e-3,
                    "{dtype:?} m={m} {class:?}: relative difference {rel}"
                );
            }
        }
    }

    /// Activations that are not one contiguous f32 slice (a transposed
    /// view, bf16) are converted, and give the contiguous f32 result.
    #[test]
    fn strided_and_half_precision_inputs_give_the_contiguous_result() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 512), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let matrix = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
        let xt = Tensor::randn(0f32, 1.0, (512, 20), &dev).unwrap();
        let strided = xt.t().unwrap();
        assert!(!strided.is_contiguous());
        let plain = strided.contiguous().unwrap();
        let rows = |t: &Tensor| matrix.forward_as(t, RowClass::Rows).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = flat(rows(&plain));
        assert_eq!(flat(rows(&strided)), want);
        let half = plain.to_dtype(DType::BF16).unwrap();
        let from_half = flat(rows(&half.to_dtype(DType::F32).unwrap()));
        assert_eq!(flat(rows(&half)), from_half);
        // A row narrowed out of a larger tensor is read at its offset.
        let row = plain.narrow(0, 7, 1).unwrap();
        assert_eq!(flat(rows(&row)), want[7 * 70..8 * 70]);
    }

    /// Products of changing sizes on two threads: each thread's band buffer
    /// is reused, grown and shrunk, and every value lands in its place (the
    /// row alone, through the single-row path that has no bands, is the
    /// reference).
    #[test]
    fn bands_place_every_value_as_their_buffers_are_reused() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let dev = Device::Cpu;
            let w = Tensor::randn(0f32, 1.0, (131, 512), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for m in [70, 3, 40, 2, 70] {
                let x = Tensor::randn(0f32, 1.0, (m, 512), &dev).unwrap();
                let together = flat(matrix.forward_as(&x, RowClass::Rows).unwrap());
                for i in 0..m {
                    let row = x.narrow(0, i, 1).unwrap();
                    let alone = flat(matrix.forward_as(&row, RowClass::Rows).unwrap());
                    assert_eq!(together[i * 131..(i + 1) * 131], alone[..], "m={m} row {i}");
                }
            }
        });
    }

    /// No rows in, no rows out, through every kernel (a step whose rows
    /// are all decode rows has an empty prompt part): a panel once indexed
    /// past its empty band.
    #[test]
    fn an_empty_input_gives_an_empty_product_in_every_format() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 512), &dev).unwrap();
        let x = Tensor::zeros((0, 512), DType::F32, &dev).unwrap();
        for dtype in FORMATS {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            for class in [RowClass::Rows, RowClass::Prompt] {
                let out = matrix.forward_as(&x, class).unwrap();
                assert_eq!(out.dims(), [0, 37], "{dtype:?} {class:?}");
            }
        }
    }

    /// Matrices that share an input quantize it once (and in tasks over
    /// the pool when it is long): each product is bitwise its own alone,
    /// for any split into decode and prompt rows and any mix of formats.
    #[test]
    fn products_sharing_an_input_are_each_bitwise_their_own() {
        let dev = Device::Cpu;
        let matrix = |rows, cols, dtype| {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            QuantMatrix::from_qtensor(&q).unwrap().unwrap()
        };
        // 37 rows of 512 (18,944 values: quantized in several tasks), and
        // of 288, a width of whole 32-value blocks but not of pairs (Q4_0's
        // row kernel's unit), which candle's kernels take for Q4_0 and
        // `q8_0_panel::dot_rows` for Q8_0 (nine blocks: all its scalar tail).
        for (cols, dtypes) in [
            (512, [GgmlDType::Q4K, GgmlDType::Q4K, GgmlDType::Q6K]),
            (512, [GgmlDType::Q8_0, GgmlDType::Q5K, GgmlDType::Q4_0]),
            (288, [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q8_0]),
        ] {
            let x = Tensor::randn(0f32, 1.0, (37, cols), &dev).unwrap();
            let alone = |w: &QuantMatrix, split: usize| {
                let part = |from, len, class| {
                    bits(
                        w.forward_as(&x.narrow(0, from, len).unwrap(), class)
                            .unwrap(),
                    )
                };
                let mut out = part(0, split, RowClass::Rows);
                out.extend(part(split, 37 - split, RowClass::Prompt));
                out
            };
            let ws = [
                matrix(131, cols, dtypes[0]),
                matrix(67, cols, dtypes[1]),
                matrix(16, cols, dtypes[2]),
            ];
            for split in [0, 1, 5, 37] {
                let together =
                    QuantMatrix::forward_split_each([&ws[0], &ws[1], &ws[2]], &x, split).unwrap();
                for (w, out) in ws.iter().zip(together) {
                    assert_eq!(
                        bits(out),
                        alone(w, split),
                        "{:?} among {dtypes:?} of {cols}, {split} decode rows",
                        w.dtype
                    );
                }
            }
        }
        // One matrix of another width: an error, not a product.
        let x = Tensor::randn(0f32, 1.0, (3, 512), &dev).unwrap();
        let (wide, narrow) = (
            matrix(16, 512, GgmlDType::Q8_0),
            matrix(16, 256, GgmlDType::Q8_0),
        );
        let err = QuantMatrix::forward_split_each([&wide, &narrow], &x, 0).unwrap_err();
        assert!(
            err.to_string()
                .contains("input has 512 features, the matrix 256"),
            "{err}"
        );
    }

    /// Rows too wide for a tile's activations to stay in L1 (a 7B's FFN
    /// down projection: 14336 columns) are taken in spans, each row's
    /// lanes carried from one to the next: bitwise the row taken whole (one
    /// token alone goes through the single-row path), in every format.
    #[test]
    fn rows_taken_in_spans_are_bitwise_the_rows_taken_whole() {
        let dev = Device::Cpu;
        let cols = 14336;
        if !q4k::have_vnni() {
            eprintln!("no AVX-512 VNNI on this CPU: rows are taken whole");
        }
        // 33 rows: two groups of `SPAN_ROWS` and one row (fewer than the
        // prefetch runs ahead).
        let w = super::super::test_values(33 * cols, 5);
        let w = Tensor::from_vec(w, (33, cols), &dev).unwrap();
        let x = super::super::test_values(15 * cols, 6);
        let x = Tensor::from_vec(x, (15, cols), &dev).unwrap();
        for dtype in FORMATS {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            // Tiles of eight, four and three (15), eight and two (10),
            // eight and one (9): all but one in spans.
            for m in [15, 10, 9] {
                let together = bits(
                    matrix
                        .forward_as(&x.narrow(0, 0, m).unwrap(), RowClass::Rows)
                        .unwrap(),
                );
                for (i, row) in together.chunks(33).enumerate() {
                    let x = x.narrow(0, i, 1).unwrap();
                    let alone = bits(matrix.forward_as(&x, RowClass::Rows).unwrap());
                    assert_eq!(row, alone, "{dtype:?}: token {i} of {m}");
                }
            }
        }
        // These rows are taken in spans where the kernels can; rows of 4096
        // whole where eight tokens' activations fit L1 (Q8_K: 40 KiB), in
        // spans where they do not (Q4_0's Q8_0 pairs: 64 KiB).
        fn spans<K: Kernel, const N: usize>(cols: usize) -> Option<(usize, usize)> {
            let row_bytes = cols / K::BLOCK_VALUES * K::BLOCK_BYTES;
            let rows = Rows::<K> {
                data: &[],
                row_bytes,
                kernel: std::marker::PhantomData,
            };
            rows.spans::<N>()
        }
        if q4k::have_vnni() {
            assert_eq!(spans::<Q4K, 8>(cols), Some((56, 12)));
            assert_eq!(spans::<Q4K, 4>(cols), Some((56, 25)));
            assert_eq!(spans::<Q4K, 3>(cols), Some((56, 34)));
            assert!(spans::<Q4_0, 2>(cols).is_some());
            assert!(spans::<Q6K, 8>(cols).is_some() && spans::<Q5K, 8>(cols).is_some());
            assert!(spans::<Q4_0, 4>(cols).is_some());
            assert!(spans::<Q4_0, 8>(cols).is_some());
            assert_eq!(spans::<Q4K, 8>(4096), None);
            assert_eq!(spans::<Q4_0, 8>(4096), Some((64, 32)));
            assert_eq!(spans::<Q4K, 1>(cols), None);
        }
    }

    /// A row's result is bitwise the same whatever else shares the pass,
    /// through the row kernels and through the panels, for any number of
    /// rows. (What lets a batch of many sequences answer each as alone, and
    /// a prompt give the same keys however it is cut into chunks.)
    #[test]
    fn each_row_is_bitwise_independent_of_the_batch_for_every_format() {
        let dev = Device::Cpu;
        // 131 rows: tasks of 64 and an odd row out; 512 columns: two Q8_K blocks.
        let w = Tensor::randn(0f32, 1.0, (131, 512), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (37, 512), &dev).unwrap();
        for dtype in FORMATS {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let rows = |m: usize, class| {
                bits(
                    matrix
                        .forward_as(&x.narrow(0, 0, m).unwrap(), class)
                        .unwrap(),
                )
            };
            let alone: Vec<Vec<u32>> = (0..37)
                .map(|i| {
                    bits(
                        matrix
                            .forward_as(&x.narrow(0, i, 1).unwrap(), RowClass::Rows)
                            .unwrap(),
                    )
                })
                .collect();
            for m in [2, 3, 4, 5, 8, 15, 16, 37] {
                let together = rows(m, RowClass::Rows);
                for (i, row) in together.chunks(131).enumerate() {
                    assert_eq!(
                        row, alone[i],
                        "{dtype:?}: row {i} of {m} through the row kernels"
                    );
                }
            }
            let more = rows(37, RowClass::Prompt);
            for m in [1, 2, 3, 5, 15, 16] {
                assert_eq!(
                    rows(m, RowClass::Prompt)[..],
                    more[..m * 131],
                    "{dtype:?}: prompt rows of {m} and of 37"
                );
            }
            let seventh = matrix.forward_as(&x.narrow(0, 7, 1).unwrap(), RowClass::Prompt);
            assert_eq!(
                bits(seventh.unwrap())[..],
                more[7 * 131..8 * 131],
                "{dtype:?}"
            );
        }
    }

    /// A Q4_K or Q6_K matrix whose repacked copy is planned gives every row the
    /// panels' sums, whatever its class and the batch: the same bits before
    /// the copy exists (through `Panel::pack`) and after (through
    /// `Repacked::multiply` for a few tokens, `pack_repacked` for many), so
    /// an answer does not change when the copy arrives. A decode product
    /// that finds no copy makes it; a prompt does not.
    #[test]
    fn a_planned_repack_gives_the_same_bits_before_and_after_the_copy() {
        if !q4k_panel::Panel::available() {
            eprintln!("no AVX-512 VNNI on this CPU: no repacked copies");
            return;
        }
        for format in [GgmlDType::Q4K, GgmlDType::Q6K] {
            planned_repack_keeps_its_bits(format);
        }
    }

    fn planned_repack_keeps_its_bits(format: GgmlDType) {
        let dev = Device::Cpu;
        // 149 rows: two tasks of 64 (four groups each), a partial task of
        // 21 (one group and five rows past it); 512 columns: two blocks.
        let (n, k) = (149, 512);
        let w = Tensor::from_vec(super::super::test_values(n * k, 5), (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, format).unwrap();
        let plain = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
        let planned = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
        let repack = planned.repack().unwrap().clone();
        repack.plan(false, None);
        assert!(!planned.has_prompt_kernel() && plain.has_prompt_kernel());
        let counts = [
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8,
            9,
            12,
            REPACKED_PACK_FROM - 1,
            REPACKED_PACK_FROM + 3,
        ];
        let x = Tensor::from_vec(super::super::test_values(40 * k, 6), (40, k), &dev).unwrap();
        let product = |m: &QuantMatrix, rows: usize, class| {
            bits(m.forward_as(&x.narrow(0, 0, rows).unwrap(), class).unwrap())
        };
        let before: Vec<Vec<u32>> = counts
            .iter()
            .map(|&m| product(&planned, m, RowClass::Prompt))
            .collect();
        assert!(repack.copy().is_none(), "a prompt made the copy");
        assert_eq!(&product(&planned, 1, RowClass::Rows), &before[0], "decode");
        assert!(repack.copy().is_some(), "decode did not make the copy");
        assert_eq!(repack.make(false, true), format.type_size() * 16 * 2 * 9);
        for (&m, want) in counts.iter().zip(&before) {
            for class in [RowClass::Rows, RowClass::Prompt] {
                assert_eq!(
                    &product(&planned, m, class),
                    want,
                    "{format:?}: {m} rows, {class:?}, copied"
                );
            }
            // Each row as it would be alone, and near the row kernels'.
            assert_eq!(want[..n], before[0][..], "row 0 of {m}");
            let rows = plain
                .forward_as(&x.narrow(0, 0, m).unwrap(), RowClass::Rows)
                .unwrap();
            let panels = Tensor::from_vec(
                want.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>(),
                (m, n),
                &dev,
            )
            .unwrap();
            let diff = (rows - panels).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-3, "{m} rows");
        }
        // Each token's row is bitwise itself alone.
        let together = &before[counts.len() - 1];
        for i in 0..counts[counts.len() - 1] {
            let alone = bits(
                planned
                    .forward_as(&x.narrow(0, i, 1).unwrap(), RowClass::Rows)
                    .unwrap(),
            );
            assert_eq!(together[i * n..(i + 1) * n], alone[..], "row {i}");
        }
    }

    /// A NaN activation makes its row's outputs NaN through every kernel of
    /// this crate, and leaves the other rows finite: the activation
    /// quantizers once made it a block of zeros with a finite scale, so a
    /// NaN from a corrupt weight or an overflow vanished into garbage.
    #[test]
    fn a_nan_activation_makes_its_row_nan_in_every_format() {
        if !super::super::q4k::have_vnni() {
            eprintln!("no VNNI: candle's kernels and quantizers run here");
            return;
        }
        let dev = Device::Cpu;
        let values = |n: usize, seed: u64| super::super::test_values(n, seed);
        let w = Tensor::from_vec(values(131 * 512, 3), (131, 512), &dev).unwrap();
        let mut xs = values(3 * 512, 4);
        xs[512 + 100] = f32::NAN;
        let x = Tensor::from_vec(xs, (3, 512), &dev).unwrap();
        for dtype in FORMATS {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            for class in [RowClass::Rows, RowClass::Prompt] {
                let out: Vec<Vec<f32>> = matrix.forward_as(&x, class).unwrap().to_vec2().unwrap();
                assert!(out[1].iter().all(|v| v.is_nan()), "{dtype:?} {class:?}");
                let others = out[0].iter().chain(&out[2]);
                assert!(others.clone().all(|v| v.is_finite()), "{dtype:?} {class:?}");
            }
        }
    }

    /// `has_prompt_kernel` holds exactly when prompt rows take other
    /// kernels than the row kernels (results that differ in the last bits):
    /// `Linear::forward_split` keeps a batch's decode rows out of the
    /// panels by it, so a format whose arm is wrong would let a sequence's
    /// answer depend on what else shares the step.
    #[test]
    fn has_prompt_kernel_says_when_prompt_rows_take_other_kernels() {
        let dev = Device::Cpu;
        let values = |n: usize, seed: u64| super::super::test_values(n, seed);
        let w = Tensor::from_vec(values(131 * 512, 7), (131, 512), &dev).unwrap();
        let x = Tensor::from_vec(values(16 * 512, 8), (16, 512), &dev).unwrap();
        for dtype in FORMATS {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let class = |class| bits(matrix.forward_as(&x, class).unwrap());
            let differ = class(RowClass::Prompt) != class(RowClass::Rows);
            assert_eq!(matrix.has_prompt_kernel(), differ, "{dtype:?}");
        }
    }
}
