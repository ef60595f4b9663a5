//! The two kinds of weight matrix the decoder multiplies by: dense tensors
//! and ggml-quantized blocks. One model serves both; only these types know
//! the difference.
//!
//! candle's `QMatMul` already picks the fastest kernel for a quantized
//! matrix (repacked AVX-512/VNNI tiles on x86, MMQ/MMVQ on CUDA); what it
//! lacks is a dense variant that reads the Hugging Face `[out, in]` layout
//! without a transpose copy and in any dtype, which `Dense` adds.

use crate::kernels::bf16::Bf16Matrix;
use crate::kernels::qmatmul::QuantMatrix;
use crate::kernels::{RowClass, RowSplit};
use anyhow::Result;
use bytes::Bytes;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

/// Every result of `outs`, or the first error.
fn all_ok<T, const N: usize>(outs: [Result<T>; N]) -> Result<[T; N]> {
    let outs: Vec<T> = outs.into_iter().collect::<Result<_>>()?;
    Ok(crate::kernels::into_array(outs))
}

/// A weight matrix `[out, in]` in the Hugging Face layout.
pub enum Linear {
    Dense(Tensor),
    /// bf16 weights on the CPU, through this crate's kernel (`bf16`).
    CpuBf16(Bf16Matrix),
    /// Quantized blocks on the CPU, through this crate's kernels.
    CpuQuantized(QuantMatrix),
    /// Quantized blocks anywhere else (CUDA), through candle's.
    Quantized(QMatMul),
}

impl Linear {
    /// `x @ w.T` for `x: [seq, in]`, in `x`'s dtype whatever the matrix's
    /// kind (this crate's kernels compute in f32: a file that mixes f16 and
    /// quantized matrices runs in f16 all the same). The transpose of a
    /// dense weight is a view that gemm reads strided.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_as(x, RowClass::Prompt)
    }

    /// `x @ w.T` with the first `rows` rows of `x` (decode rows) through
    /// the row kernels and the rest (prompt positions) through the prompt
    /// kernels, in `x`'s dtype: each row takes the kernels it would alone
    /// (see [`RowClass`]). Two passes over the weights only when the
    /// matrix has prompt kernels and both parts are there.
    pub fn forward_split(&self, x: &Tensor, rows: usize) -> Result<Tensor> {
        let [out] = Self::forward_split_each([self], x, rows)?;
        Ok(out)
    }

    /// [`forward_split`](Self::forward_split) for every matrix of `ws` on
    /// the same input. When all of them are this crate's quantized
    /// matrices, each part of `x` is quantized once for all of them (the
    /// decoder's q, k and v; its gate and up; see
    /// [`QuantMatrix::forward_split_each`]); otherwise each goes alone.
    pub fn forward_split_each<const N: usize>(
        ws: [&Self; N],
        x: &Tensor,
        rows: usize,
    ) -> Result<[Tensor; N]> {
        let quantized = ws.map(|w| match w {
            Self::CpuQuantized(q) => Some(q),
            _ => None,
        });
        if quantized.iter().all(Option::is_some) {
            let qs = quantized.map(|q| q.expect("checked: every matrix is quantized"));
            let outs = QuantMatrix::forward_split_each(qs, x, rows)?;
            return all_ok(outs.map(|out| Ok(out.to_dtype(x.dtype())?)));
        }
        all_ok(ws.map(|w| w.forward_split_one(x, rows)))
    }

    /// One matrix's `forward_split` outside this crate's quantized kernels.
    fn forward_split_one(&self, x: &Tensor, rows: usize) -> Result<Tensor> {
        let prompt_kernel = match self {
            Self::CpuBf16(w) => w.has_prompt_kernel(),
            Self::CpuQuantized(q) => q.has_prompt_kernel(),
            // candle's kernels: one pass, as before (not batch-invariant).
            Self::Dense(_) | Self::Quantized(_) => false,
        };
        match RowSplit::new(rows, x.dim(0)?, prompt_kernel) {
            RowSplit::All(class) => self.forward_as(x, class),
            RowSplit::At(at) => {
                let head = self.forward_as(&x.narrow(0, 0, at)?, RowClass::Rows)?;
                let tail = self.forward_as(&x.narrow(0, at, x.dim(0)? - at)?, RowClass::Prompt)?;
                Ok(Tensor::cat(&[head, tail], 0)?)
            }
        }
    }

    /// `x @ w.T` through the kernels of `class` (this crate's kernels only;
    /// candle's choose their own), in `x`'s dtype.
    pub fn forward_as(&self, x: &Tensor, class: RowClass) -> Result<Tensor> {
        let out = match self {
            Self::Dense(w) => x.matmul(&w.t()?)?,
            Self::CpuBf16(w) => w.forward_as(x, class)?,
            Self::CpuQuantized(q) => q.forward_as(x, class)?,
            Self::Quantized(q) => q.forward(x)?,
        };
        Ok(out.to_dtype(x.dtype())?)
    }

    /// A dense matrix: bf16 on the CPU goes to this crate's kernel (candle
    /// has none), anything else to candle's matmul.
    pub fn dense(w: Tensor) -> Result<Self> {
        if w.dtype() == DType::BF16 && w.device().is_cpu() {
            return Ok(Self::CpuBf16(Bf16Matrix::new(&w)?));
        }
        Ok(Self::Dense(w))
    }

    /// A bf16 matrix of `shape` in little-endian bytes, used in place
    /// (a slice of a GGUF's or safetensors' memory map).
    pub fn bf16_from_bytes(bytes: Bytes, shape: &[usize]) -> Result<Self> {
        Ok(Self::CpuBf16(Bf16Matrix::from_bytes(bytes, shape)?))
    }

    /// A matrix quantized while loading (`--quantize`), or one of a format
    /// without a kernel here: this crate's kernels on the CPU (a copy of
    /// the blocks), candle's `QMatMul` elsewhere.
    pub fn quantized(q: Arc<QTensor>) -> Result<Self> {
        match QuantMatrix::from_qtensor(&q)? {
            Some(m) => Ok(Self::CpuQuantized(m)),
            None => Ok(Self::Quantized(QMatMul::from_arc(q)?)),
        }
    }

    /// Stored ggml blocks `[rows, cols]` of `dtype` on `device`: on the CPU
    /// used in place when a kernel here reads the format (zero-copy),
    /// otherwise loaded into a candle `QTensor`.
    pub fn quantized_bytes(
        dtype: GgmlDType,
        data: Bytes,
        shape: &[usize],
        device: &Device,
    ) -> Result<Self> {
        let [rows, cols] = *shape else {
            anyhow::bail!("a matrix needs two dimensions, not {shape:?}");
        };
        if device.is_cpu()
            && let Some(m) = QuantMatrix::new(dtype, data.clone(), rows, cols)?
        {
            return Ok(Self::CpuQuantized(m));
        }
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &data,
            shape.to_vec(),
            device,
        )?;
        Ok(Self::Quantized(QMatMul::from_arc(Arc::new(q))?))
    }

    /// The bytes this crate's kernels read in place (bf16 or ggml blocks on
    /// the CPU; a slice of the model file's memory map when loaded from
    /// one), `None` for the tensors candle owns.
    pub fn kernel_bytes(&self) -> Option<&[u8]> {
        match self {
            Self::CpuBf16(w) => Some(w.data()),
            Self::CpuQuantized(q) => Some(q.data()),
            Self::Dense(_) | Self::Quantized(_) => None,
        }
    }

    /// Bytes the weights occupy.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) | Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                dense_bytes(t)
            }
            Self::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Self::CpuQuantized(q) => q.bytes(),
            Self::CpuBf16(w) => w.bytes(),
        }
    }

    /// The storage format, as bench reports it (`F16`, `Q4K`, ...).
    pub fn format(&self) -> String {
        match self {
            Self::Dense(t) | Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                format!("{:?}", t.dtype()).to_uppercase()
            }
            Self::Quantized(QMatMul::QTensor(q)) => format!("{:?}", q.dtype()),
            Self::CpuQuantized(q) => format!("{:?}", q.dtype()),
            Self::CpuBf16(_) => "BF16".to_string(),
        }
    }
}

pub(crate) fn dense_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// The token embedding table `[vocab, hidden]`. A quantized table is read a
/// row at a time (dequantizing only the rows asked for), so a 4-bit model
/// never holds an f32 copy of its 32k × 4096 embeddings.
pub enum Embedding {
    Dense(Tensor),
    /// bf16 on the CPU, in place (usually the file's memory map).
    CpuBf16(Bf16Matrix),
    /// Blocks on the CPU, in place (usually the file's memory map).
    CpuQuantized(QuantMatrix),
    /// Blocks anywhere else, or of a format `QuantMatrix` does not read.
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// Rows `ids` as `[ids.len(), hidden]` in `dtype`.
    pub fn forward(&self, ids: &[u32], dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(table) => {
                let ids = Tensor::from_slice(ids, ids.len(), device)?;
                table.index_select(&ids, 0)?.to_dtype(dtype)?
            }
            Self::CpuBf16(m) => {
                Tensor::from_vec(m.rows(ids)?, (ids.len(), m.cols()), device)?.to_dtype(dtype)?
            }
            Self::CpuQuantized(q) => {
                let rows = q.dequantize_rows(ids)?;
                Tensor::from_vec(rows, (ids.len(), q.cols()), device)?.to_dtype(dtype)?
            }
            Self::Quantized(q) => {
                let ids = Tensor::from_slice(ids, ids.len(), device)?;
                q.embedding(&ids)?.to_dtype(dtype)?
            }
        })
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => dense_bytes(t),
            Self::CpuBf16(m) => m.bytes(),
            Self::CpuQuantized(q) => q.bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// The output matrix that shares this table's storage (a tied `lm_head`).
    pub fn tied_head(&self) -> Result<Linear> {
        match self {
            Self::Dense(t) => Linear::dense(t.clone()),
            Self::CpuBf16(m) => Ok(Linear::CpuBf16(m.clone())),
            Self::CpuQuantized(q) => Ok(Linear::CpuQuantized(q.clone())),
            Self::Quantized(q) => Linear::quantized(q.clone()),
        }
    }
}

/// Whether `dtype` is a ggml block format (as opposed to a float format).
pub fn is_block_format(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// `--quantize` types: the ggml block formats a dense checkpoint can be
/// quantized to while loading (and `starling quantize` writes).
pub fn parse_quant(name: &str) -> Result<GgmlDType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4k" | "q4_k" => GgmlDType::Q4K,
        "q5k" | "q5_k" => GgmlDType::Q5K,
        "q6k" | "q6_k" => GgmlDType::Q6K,
        "q8_0" => GgmlDType::Q8_0,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "f32" => GgmlDType::F32,
        other => {
            anyhow::bail!(
                "unknown quantization {other:?} (q4k, q5k, q6k, q8_0, q4_0, f16, bf16, f32)"
            )
        }
    })
}

/// Quantizes a dense weight to `dtype` on `device`, or, when its rows are
/// not a whole number of `dtype`'s blocks (k-quants need 256 values; small
/// models have narrower rows), to the nearest format that fits: Q8_0, else
/// F16. llama.cpp's quantizer falls back the same way.
pub fn quantize(w: &Tensor, dtype: GgmlDType, device: &Device) -> Result<Arc<QTensor>> {
    let w = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let cols = w.dim(candle_core::D::Minus1)?;
    let dtype = [dtype, GgmlDType::Q8_0, GgmlDType::F16]
        .into_iter()
        .find(|d| cols % d.block_size() == 0)
        .unwrap_or(GgmlDType::F32);
    let q = quantize_rows_in_parallel(&w, dtype)?;
    if device.is_cpu() {
        return Ok(Arc::new(q));
    }
    let data = q.data()?;
    let storage = candle_core::quantized::QStorage::from_data(data, device, dtype)?;
    Ok(Arc::new(QTensor::new(storage, w.shape())?))
}

/// candle's quantizers run on one thread (minutes for a 7B model); rows are
/// independent whole blocks, so bands of rows are quantized on every core
/// and their bytes concatenated.
fn quantize_rows_in_parallel(w: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    use rayon::prelude::*;
    let rows = w.dim(0)?;
    let band = rows.div_ceil(rayon::current_num_threads() * 4).max(16);
    let bands: Vec<(usize, usize)> = (0..rows)
        .step_by(band)
        .map(|start| (start, band.min(rows - start)))
        .collect();
    if bands.len() <= 1 || w.rank() != 2 {
        return Ok(QTensor::quantize(w, dtype)?);
    }
    // Bands are rebuilt from a slice: candle's quantizer reads a tensor's
    // storage from its start, ignoring the offset of a narrowed view.
    let cols = w.dim(1)?;
    let values = w.flatten_all()?.to_vec1::<f32>()?;
    let parts: Vec<Vec<u8>> = bands
        .par_iter()
        .map(|&(start, len)| -> Result<Vec<u8>> {
            let slice = &values[start * cols..(start + len) * cols];
            let part = Tensor::from_slice(slice, (len, cols), &Device::Cpu)?;
            Ok(QTensor::quantize(&part, dtype)?.data()?.into_owned())
        })
        .collect::<Result<_>>()?;
    let bytes = parts.concat();
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        &bytes,
        w.dims().to_vec(),
        &Device::Cpu,
    )?)
}

/// The output matrix (`lm_head`) of a k-quant model gets at least Q6_K, as
/// llama.cpp's k-quant mixes do: it decides every token, and it costs one
/// matrix of 32.
pub fn output_quant(dtype: GgmlDType) -> GgmlDType {
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4K | GgmlDType::Q5K => GgmlDType::Q6K,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_and_dense_products_agree_within_the_format_error() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (64, 256), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 256), &dev).unwrap();
        let dense = Linear::Dense(w.clone()).forward(&x).unwrap();
        let scale = dense
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        for (dtype, tolerance) in [(GgmlDType::Q8_0, 0.02), (GgmlDType::Q4K, 0.15)] {
            let q = Linear::quantized(quantize(&w, dtype, &dev).unwrap()).unwrap();
            let got = q.forward(&x).unwrap();
            let err = (got - &dense)
                .unwrap()
                .abs()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                err / scale < tolerance,
                "{dtype:?}: relative error {}",
                err / scale
            );
        }
    }

    /// A model mixing f16 and quantized matrices computes in f16: every
    /// kind answers in the activations' dtype (it failed with "dtype
    /// mismatch in add" before).
    #[test]
    fn every_kind_answers_in_the_activations_dtype() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (64, 256), &dev).unwrap();
        let kinds = [
            Linear::quantized(quantize(&w, GgmlDType::Q8_0, &dev).unwrap()).unwrap(),
            Linear::dense(w.to_dtype(DType::BF16).unwrap()).unwrap(),
            Linear::dense(w.to_dtype(DType::F16).unwrap()).unwrap(),
        ];
        let x = Tensor::randn(0f32, 1.0, (3, 256), &dev).unwrap();
        for dtype in [DType::F16, DType::F32] {
            let x = x.to_dtype(dtype).unwrap();
            for kind in &kinds {
                let out = kind.forward(&x);
                // candle has no f32 × f16 matmul: the dense f16 matrix
                // takes f16 activations only; the kernels take either.
                if let Ok(out) = out {
                    assert_eq!(out.dtype(), dtype, "{}", kind.format());
                } else {
                    assert!(matches!(kind, Linear::Dense(_)) && dtype == DType::F32);
                }
            }
        }
    }

    #[test]
    fn quantizing_in_bands_gives_the_bytes_of_quantizing_whole() {
        let w = Tensor::randn(0f32, 1.0, (300, 256), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4K, GgmlDType::Q8_0] {
            let whole = QTensor::quantize(&w, dtype).unwrap();
            let banded = quantize(&w, dtype, &Device::Cpu).unwrap();
            assert_eq!(banded.data().unwrap(), whole.data().unwrap(), "{dtype:?}");
            assert_eq!(banded.shape(), whole.shape());
        }
    }

    #[test]
    fn rows_that_do_not_fill_blocks_fall_back_to_a_format_that_fits() {
        let q = |cols: usize| {
            let w = Tensor::zeros((4, cols), DType::F32, &Device::Cpu).unwrap();
            quantize(&w, GgmlDType::Q4K, &Device::Cpu).unwrap().dtype()
        };
        assert_eq!(q(512), GgmlDType::Q4K);
        assert_eq!(q(160), GgmlDType::Q8_0);
        assert_eq!(q(100), GgmlDType::F16);
    }

    fn in_place_again(table: &Tensor) -> Embedding {
        let q = quantize(table, GgmlDType::Q8_0, &Device::Cpu).unwrap();
        Embedding::CpuQuantized(QuantMatrix::from_qtensor(&q).unwrap().unwrap())
    }

    #[test]
    fn quantized_embedding_rows_match_the_dense_table() {
        let dev = Device::Cpu;
        let table = Tensor::randn(0f32, 1.0, (10, 64), &dev).unwrap();
        let ids = [3u32, 7, 3];
        let dense = Embedding::Dense(table.clone())
            .forward(&ids, DType::F32, &dev)
            .unwrap();
        let q = quantize(&table, GgmlDType::Q8_0, &dev).unwrap();
        let in_place = Embedding::CpuQuantized(QuantMatrix::from_qtensor(&q).unwrap().unwrap());
        for table in [Embedding::Quantized(q), in_place] {
            let got = table.forward(&ids, DType::F32, &dev).unwrap();
            let err = (got - &dense).unwrap().abs().unwrap().max_all().unwrap();
            assert!(err.to_scalar::<f32>().unwrap() < 0.05);
        }
        let Embedding::CpuQuantized(q) = &in_place_again(&table) else {
            unreachable!()
        };
        let err = q.dequantize_rows(&[10]).unwrap_err().to_string();
        assert!(err.contains("token id 10"), "{err}");
    }
}
