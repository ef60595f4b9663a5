//! Checkpoints, handed to the model one named tensor at a time with its
//! shape checked: safetensors (single or sharded, memory-mapped) or PyTorch
//! `.bin` pickles (single or sharded), read lazily so that each tensor is
//! converted to the run's dtype on its own: a 27 GB f32 checkpoint becomes
//! bf16 without ever being whole in memory.
//!
//! candle's VarBuilder would do the lookup, but its errors name neither the
//! file nor both shapes in a sentence a user can act on; this thin layer over
//! candle's `MmapedSafetensors` and starling's own pickle reader does.

pub mod gguf;
pub mod gguf_header;
pub mod pickle;

use crate::model::linear::{self, Embedding, Linear};
use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

enum Store {
    /// The deterministic weights of `model::synthetic`, made on demand (benchmarks).
    Synthetic {
        names: HashMap<String, (usize, Vec<usize>)>,
    },
    Safetensors(MmapedSafetensors),
    /// One lazy reader per shard, and which shard holds each tensor.
    Pickle {
        shards: Vec<pickle::PthFile>,
        routing: HashMap<String, usize>,
    },
    Gguf(Box<gguf::Gguf>),
}

/// The tensor whose stored type stands for a GGUF file's matrices.
const PROBE_MATRIX: &str = "model.layers.0.mlp.up_proj.weight";

pub struct Weights {
    store: Store,
    files: Vec<PathBuf>,
    /// `--quantize`: the ggml type dense matrices are quantized to on load.
    quantize: Option<GgmlDType>,
}

fn is_pickle(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth")
    )
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The shard files named by `model.safetensors.index.json`, in a stable order.
pub fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let parsed: ShardIndex =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let names: BTreeSet<&String> = parsed.weight_map.values().collect();
    if names.is_empty() {
        bail!("{} lists no weight files", index.display());
    }
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

impl Weights {
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                bail!("weights file {} is missing", f.display());
            }
        }
        let store = if let [one] = files
            && gguf::is_gguf(one)
        {
            Store::Gguf(Box::new(gguf::Gguf::open(one)?))
        } else if files.iter().all(|f| is_pickle(f)) {
            let mut shards = Vec::with_capacity(files.len());
            let mut routing = HashMap::new();
            for (i, f) in files.iter().enumerate() {
                let shard = pickle::PthFile::open(f).map_err(|e| {
                    anyhow::anyhow!("{}: not a valid PyTorch checkpoint: {e:#}", f.display())
                })?;
                for name in shard.tensors().keys() {
                    routing.insert(name.clone(), i);
                }
                shards.push(shard);
            }
            Store::Pickle { shards, routing }
        } else {
            // SAFETY: the files are mapped read-only; like every mmap-based loader
            // (candle, safetensors, llama.cpp) we assume nobody truncates them while
            // the model runs.
            let tensors = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a valid safetensors file (truncated or corrupt?): {e}",
                    describe(files)
                )
            })?;
            Store::Safetensors(tensors)
        };
        Ok(Self {
            store,
            files: files.to_vec(),
            quantize: None,
        })
    }

    /// Quantizes every matrix to `dtype` while loading (`None`: as stored).
    pub fn quantize_to(mut self, dtype: Option<GgmlDType>) -> Self {
        self.quantize = dtype;
        self
    }

    /// The GGUF file behind these weights, if that is what they are.
    pub fn gguf(&self) -> Option<&gguf::Gguf> {
        match &self.store {
            Store::Gguf(g) => Some(g),
            _ => None,
        }
    }

    /// Whether the matrices will be ggml-quantized (so activations run in f32).
    pub fn is_quantized(&self) -> bool {
        self.quantize.is_some_and(linear::is_block_format)
            || self
                .gguf()
                .and_then(|g| g.stored_type(PROBE_MATRIX))
                .is_some_and(linear::is_block_format)
    }

    /// Matrix `name` `[out, in]`: dense in `dtype`, or quantized when the
    /// file stores it so or `--quantize` asks; `output` marks `lm_head`,
    /// which k-quant mixes keep at Q6_K or better.
    pub fn linear(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
        output: bool,
    ) -> Result<Linear> {
        let target = self
            .quantize
            .map(|q| if output { linear::output_quant(q) } else { q });
        if let (Store::Gguf(g), None) = (&self.store, target) {
            let q = g.tensor(name, shape, device)?;
            return match q.dtype() {
                // Straight from the file's bytes: no f32 copy of a 7B model's matrices.
                GgmlDType::BF16 if dtype == DType::BF16 && device.is_cpu() => {
                    Linear::bf16_from_bytes(&q.data()?, shape)
                }
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                    Linear::dense(q.dequantize(device)?.to_dtype(dtype)?)
                }
                _ => Linear::quantized(std::sync::Arc::new(q)),
            };
        }
        match target {
            Some(q) if linear::is_block_format(q) => {
                let dense = self.tensor(name, shape, DType::F32, &Device::Cpu)?;
                let quantized = linear::quantize(&dense, q, device)
                    .with_context(|| format!("quantizing {name}"))?;
                Linear::quantized(quantized)
            }
            _ => Linear::dense(self.tensor(name, shape, dtype, device)?),
        }
    }

    /// The embedding table: quantized rows stay quantized (see `Embedding`).
    pub fn embedding(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Embedding> {
        // A bf16 run on the CPU only indexes the table: keep it a bf16
        // tensor rather than building the matrix kernel's copy of it.
        let stored_blocks = self
            .gguf()
            .and_then(|g| g.stored_type(name))
            .is_some_and(linear::is_block_format);
        if dtype == DType::BF16 && device.is_cpu() && self.quantize.is_none() && !stored_blocks {
            return Ok(Embedding::Dense(self.tensor(name, shape, dtype, device)?));
        }
        match self.linear(name, shape, dtype, device, false)? {
            Linear::Dense(t) => Ok(Embedding::Dense(t)),
            Linear::CpuBf16(_) => unreachable!("bf16 tables on the CPU return above"),
            Linear::CpuQuantized(q) => Ok(Embedding::Quantized(q.qtensor().clone())),
            Linear::Quantized(q) => match q {
                candle_core::quantized::QMatMul::QTensor(q) => Ok(Embedding::Quantized(q)),
                candle_core::quantized::QMatMul::Tensor(t)
                | candle_core::quantized::QMatMul::TensorF16(t) => {
                    Ok(Embedding::Dense(t.to_dtype(dtype)?))
                }
            },
        }
    }

    /// Weights for `config` computed on demand from the deterministic-weights
    /// formula, in memory, so the real shape of a 7B model can be measured
    /// without a download or a file.
    pub fn synthetic(config: &crate::model::Config) -> Self {
        let names = crate::model::synthetic::tensor_shapes(config)
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape))| (name, (k, shape)))
            .collect();
        Self {
            store: Store::Synthetic { names },
            files: Vec::new(),
            quantize: None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.store {
            Store::Synthetic { names } => names.contains_key(name),
            Store::Safetensors(st) => st.get(name).is_ok(),
            Store::Pickle { routing, .. } => routing.contains_key(name),
            Store::Gguf(g) => g.contains(name),
        }
    }

    /// The dtype most tensors are stored in (the checkpoint's own precision).
    pub fn stored_dtype(&self) -> Option<DType> {
        let mut counts = HashMap::new();
        match &self.store {
            Store::Synthetic { .. } => return Some(DType::F32),
            Store::Gguf(g) => {
                return match g.stored_type(PROBE_MATRIX)? {
                    GgmlDType::F16 => Some(DType::F16),
                    GgmlDType::BF16 => Some(DType::BF16),
                    _ => Some(DType::F32),
                };
            }
            Store::Safetensors(st) => {
                for (_, view) in st.tensors() {
                    if let Ok(dtype) = DType::try_from(view.dtype()) {
                        *counts.entry(dtype).or_insert(0usize) += 1;
                    }
                }
            }
            Store::Pickle { shards, .. } => {
                for info in shards.iter().flat_map(|s| s.tensors().values()) {
                    *counts.entry(info.dtype).or_insert(0usize) += 1;
                }
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }

    /// Tensor `name`, checked against `shape`, converted to `dtype` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let missing = || anyhow::anyhow!("tensor {name} is missing from {}", describe(&self.files));
        let wrong = |got: &[usize]| {
            anyhow::anyhow!("tensor {name} has shape {got:?}, expected {shape:?} from config.json")
        };
        let tensor = match &self.store {
            Store::Synthetic { names } => {
                let (k, stored) = names.get(name).ok_or_else(missing)?;
                if stored.as_slice() != shape {
                    return Err(wrong(stored));
                }
                let values =
                    crate::model::synthetic::tensor_values(name, *k, shape.iter().product());
                return Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(device)?);
            }
            Store::Safetensors(st) => {
                let view = st.get(name).map_err(|_| missing())?;
                if view.shape() != shape {
                    return Err(wrong(view.shape()));
                }
                view.load(device)
                    .with_context(|| format!("loading tensor {name}"))?
            }
            Store::Pickle { shards, routing } => {
                let shard = &shards[*routing.get(name).ok_or_else(missing)?];
                let info = &shard.tensors()[name];
                if info.shape != shape {
                    return Err(wrong(&info.shape));
                }
                let cpu = shard
                    .get(name)
                    .with_context(|| format!("tensor {name} in {}", describe(&self.files)))?;
                // Convert on the CPU first so only the run's dtype reaches the device.
                return Ok(cpu.to_dtype(dtype)?.to_device(device)?);
            }
            Store::Gguf(g) => g
                .tensor(name, shape, &Device::Cpu)?
                .dequantize(&Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?,
        };
        Ok(tensor.to_dtype(dtype)?)
    }
}

/// Text from a file, for an error message: quoted and escaped (so it stays
/// on one line) and cut to 64 characters (a corrupt length can make a
/// "name" swallow megabytes).
pub(crate) fn shown(text: &str) -> String {
    let mut cut: String = text.chars().take(64).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

fn describe(files: &[PathBuf]) -> String {
    match files {
        [] => "the synthetic weights".to_string(),
        [one] => one.display().to_string(),
        many => format!(
            "{} shards in {}",
            many.len(),
            many[0].parent().unwrap_or(Path::new(".")).display()
        ),
    }
}
