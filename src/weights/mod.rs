//! Checkpoints, handed to the model one named tensor at a time with its
//! shape checked: GGUF and safetensors (single or sharded, memory-mapped)
//! or PyTorch `.bin` pickles (single or sharded), read lazily so that each
//! tensor is converted to the run's dtype on its own: a 27 GB f32
//! checkpoint becomes bf16 without ever being whole in memory.
//!
//! Matrices the kernels read as stored (ggml blocks, bf16) are handed over
//! as slices of the memory map (`bytes::Bytes`): a cached 7B model starts
//! without reading or copying its weights. Everything else (f32/f16
//! matrices, norms, a `--quantize` or `--dtype` conversion) is a copy.
//!
//! candle's VarBuilder would do the lookup, but its errors name neither the
//! file nor both shapes in a sentence a user can act on, and its storage
//! owns a `Vec` (a copy of every mapped tensor); this thin layer over the
//! `safetensors` crate, the GGUF reader and the pickle reader does neither.

pub mod bus_error;
pub mod gguf;
pub mod gguf_header;
pub mod pickle;
pub mod resident;

use crate::model::RopeLayout;
use crate::model::linear::{self, Embedding, Linear};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use candle_core::quantized::GgmlDType;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

enum Store {
    /// The deterministic weights of `model::synthetic`, made on demand (benchmarks).
    Synthetic {
        names: HashMap<String, (usize, Vec<usize>)>,
    },
    /// Every tensor of every shard, as a slice of its file's memory map.
    Safetensors(HashMap<String, SafeTensor>),
    /// One lazy reader per shard, and which shard holds each tensor.
    Pickle {
        shards: Vec<pickle::PthFile>,
        routing: HashMap<String, usize>,
    },
    Gguf(Box<gguf::Gguf>),
}

/// One tensor of a safetensors file: its header entry and its bytes in the map.
struct SafeTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Bytes,
}

impl SafeTensor {
    /// A copy on `device`, in the stored dtype (candle's conversions).
    fn load(&self, device: &Device) -> Result<Tensor> {
        let view =
            safetensors::tensor::TensorView::new(self.dtype, self.shape.clone(), &self.data)?;
        Ok(view.load(device)?)
    }
}

/// Maps followed without being kept alive (`resident::share`).
pub type Followed = Vec<std::sync::Weak<memmap2::Mmap>>;

/// Maps `files` and indexes their tensors; the `safetensors` crate checks
/// each header (offsets inside the file, sizes matching shapes and dtypes).
fn open_safetensors(files: &[PathBuf]) -> Result<(HashMap<String, SafeTensor>, Followed)> {
    let mut all = HashMap::new();
    let mut maps = Vec::with_capacity(files.len());
    for path in files {
        let invalid = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file (truncated or corrupt?): {e}",
                path.display()
            )
        };
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: mapped read-only; like every mmap-based loader (candle,
        // safetensors, llama.cpp) this assumes nobody truncates or rewrites
        // the file while the model runs. A truncation at least ends the run
        // in one line (`share` watches the map: `bus_error`), not a crash.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {} into memory", path.display()))?;
        let (map, weak) = resident::share(map, path);
        let parsed = safetensors::SafeTensors::deserialize(&map).map_err(|e| invalid(&e))?;
        for (name, view) in parsed.tensors() {
            let entry = SafeTensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: map.slice_ref(view.data()),
            };
            all.insert(name, entry);
        }
        maps.push(weak);
    }
    Ok((all, maps))
}

/// The tensor whose stored type stands for a GGUF file's matrices.
const PROBE_MATRIX: &str = "model.layers.0.mlp.up_proj.weight";

pub struct Weights {
    store: Store,
    files: Vec<PathBuf>,
    /// Each mapped file (GGUF, safetensors), followed without being kept
    /// alive: what `move_into_memory` moves.
    maps: Vec<std::sync::Weak<memmap2::Mmap>>,
    /// `--quantize`: the ggml type dense matrices are quantized to on load.
    quantize: Option<GgmlDType>,
    /// The matrices handed out that may get a repacked copy
    /// (`kernels::repack`), followed without being kept alive: what
    /// `finish` plans.
    repacks: std::sync::Mutex<Vec<std::sync::Weak<crate::kernels::repack::Repack>>>,
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
        let mut maps = Vec::new();
        let store = if let [one] = files
            && (gguf::is_gguf(one) || gguf::has_magic(one))
        {
            let gguf = gguf::Gguf::open(one)?;
            maps.push(gguf.followed());
            Store::Gguf(Box::new(gguf))
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
            let (tensors, mapped) = open_safetensors(files)?;
            maps = mapped;
            Store::Safetensors(tensors)
        };
        Ok(Self {
            store,
            files: files.to_vec(),
            maps,
            quantize: None,
            repacks: Default::default(),
        })
    }

    /// Drops these weights once the model is built and, unless
    /// `keep_mapped`, starts moving the maps the model still holds slices of
    /// into memory (`resident::move_into_memory`; maps it took nothing from
    /// are gone by then).
    pub fn finish(self, device: &Device, keep_mapped: bool) -> Option<resident::Mover> {
        let maps = self.maps.clone();
        let repacks = std::mem::take(&mut *self.repacks.lock().unwrap_or_else(|e| e.into_inner()));
        drop(self);
        match keep_mapped {
            true => None,
            false => resident::move_into_memory(maps, repacks, device),
        }
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

    /// How the rows of the `q_proj`/`k_proj` matrices that `linear` hands
    /// out pair the dimensions rope rotates: a GGUF's as llama.cpp stores
    /// them, everything else as transformers does.
    pub fn rope_layout(&self) -> RopeLayout {
        match &self.store {
            Store::Gguf(g) if !gguf::uses_halves(g.config()) => RopeLayout::AdjacentPairs,
            _ => RopeLayout::Halves,
        }
    }

    /// Matrix `name` `[out, in]`: dense in `dtype`, or quantized when the
    /// file stores it so or `--quantize` asks; `output` marks `lm_head`,
    /// which k-quant mixes keep at Q6_K or better. Rows in the order of
    /// `rope_layout`. Stored blocks and bf16 on the CPU stay in the memory
    /// map (zero-copy).
    pub fn linear(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
        output: bool,
    ) -> Result<Linear> {
        let linear = self.load_linear(name, shape, dtype, device, output)?;
        if let Linear::CpuQuantized(m) = &linear
            && let Some(repack) = m.repack()
        {
            let mut repacks = self.repacks.lock().unwrap_or_else(|e| e.into_inner());
            repacks.push(std::sync::Arc::downgrade(repack));
        }
        Ok(linear)
    }

    /// `linear`, without following its repacked copy (an embedding table,
    /// which is read by rows, never multiplied).
    fn load_linear(
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
            let (stored, data) = g.tensor_data(name, shape)?;
            return match stored {
                GgmlDType::BF16 if dtype == DType::BF16 && device.is_cpu() => {
                    Linear::bf16_from_bytes(data, shape)
                }
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                    Linear::dense(self.matrix(name, shape, dtype, device)?)
                }
                _ => Linear::quantized_bytes(stored, data, shape, device)
                    .with_context(|| format!("loading tensor {name}")),
            };
        }
        if let (Store::Safetensors(st), None) = (&self.store, target)
            && let Some(t) = st.get(name)
            && t.dtype == safetensors::Dtype::BF16
            && t.shape == shape
            && dtype == DType::BF16
            && device.is_cpu()
        {
            return Linear::bf16_from_bytes(t.data.clone(), shape);
        }
        match target {
            Some(q) if linear::is_block_format(q) => {
                let dense = self.matrix(name, shape, DType::F32, &Device::Cpu)?;
                let quantized = linear::quantize(&dense, q, device)
                    .with_context(|| format!("quantizing {name}"))?;
                Linear::quantized(quantized)
            }
            _ => Linear::dense(self.matrix(name, shape, dtype, device)?),
        }
    }

    /// A matrix as a dense tensor, rows in the order of `rope_layout`.
    fn matrix(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        match &self.store {
            Store::Gguf(g) => Ok(g
                .tensor(name, shape, &Device::Cpu, gguf::Rows::AsStored)?
                .dequantize(&Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?),
            _ => self.tensor(name, shape, dtype, device),
        }
    }

    /// The embedding table: quantized rows stay quantized (see `Embedding`),
    /// and bf16 on the CPU stays bf16; both in the memory map.
    pub fn embedding(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Embedding> {
        Ok(match self.load_linear(name, shape, dtype, device, false)? {
            Linear::Dense(t) => Embedding::Dense(t),
            Linear::CpuBf16(m) => Embedding::CpuBf16(m),
            Linear::CpuQuantized(q) => Embedding::CpuQuantized(q),
            Linear::Quantized(q) => match q {
                candle_core::quantized::QMatMul::QTensor(q) => Embedding::Quantized(q),
                candle_core::quantized::QMatMul::Tensor(t)
                | candle_core::quantized::QMatMul::TensorF16(t) => {
                    Embedding::Dense(t.to_dtype(dtype)?)
                }
            },
        })
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
            maps: Vec::new(),
            quantize: None,
            repacks: Default::default(),
        }
    }

    /// A bias vector `[len]` in `dtype`: it is added in the activations'
    /// dtype (f32 on the CPU for bf16 weights), so it is read as such.
    pub fn bias(&self, name: &str, len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let dtype = if device.is_cpu() && dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        };
        self.tensor(name, &[len], dtype, device)
    }

    /// Refuses a reward model's weights (a `v_head` and no `lm_head`)
    /// where a chat model is needed, by name, with what to use instead.
    pub fn ensure_not_reward_model(&self, what: &Path) -> Result<()> {
        if self.contains("v_head.weight") && !self.contains("lm_head.weight") {
            bail!(
                "{} is a reward model (a v_head and no lm_head), not a chat model: score with `starling score`, or use it as `run --best-of N --reward-model`",
                what.display()
            );
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.store {
            Store::Synthetic { names } => names.contains_key(name),
            Store::Safetensors(st) => st.contains_key(name),
            Store::Pickle { routing, .. } => routing.contains_key(name),
            Store::Gguf(g) => g.contains(name),
        }
    }

    /// The stored shape of tensor `name` (`None` when absent; GGUF files,
    /// whose names are translated, answer only for their own tensors' HF
    /// names through `contains`).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.store {
            Store::Synthetic { names } => names.get(name).map(|(_, s)| s.clone()),
            Store::Safetensors(st) => st.get(name).map(|t| t.shape.clone()),
            Store::Pickle { shards, routing } => routing
                .get(name)
                .and_then(|&i| shards[i].tensors().get(name))
                .map(|t| t.shape.clone()),
            Store::Gguf(_) => None,
        }
    }

    /// Every tensor name (not translated for GGUF: empty there), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.store {
            Store::Synthetic { names } => names.keys().cloned().collect(),
            Store::Safetensors(st) => st.keys().cloned().collect(),
            Store::Pickle { routing, .. } => routing.keys().cloned().collect(),
            Store::Gguf(_) => Vec::new(),
        };
        names.sort();
        names
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
                for t in st.values() {
                    if let Ok(dtype) = DType::try_from(t.dtype) {
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

    /// Tensor `name`, checked against `shape`, converted to `dtype` on
    /// `device`, in the Hugging Face layout (a copy).
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
                let t = st.get(name).ok_or_else(missing)?;
                if t.shape != shape {
                    return Err(wrong(&t.shape));
                }
                t.load(device)
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
                .tensor(name, shape, &Device::Cpu, gguf::Rows::HuggingFace)?
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::quantized::gguf_file::{self, Value};

    /// Whether `inner` lies inside the file at `path` as mapped by `weights`
    /// (so the kernels read the page cache's pages, not a copy).
    fn in_file(inner: &[u8], path: &Path, weights: &Weights) -> bool {
        let size = std::fs::metadata(path).unwrap().len() as usize;
        let start = match &weights.store {
            Store::Gguf(g) => g.mapped().as_ptr() as usize,
            Store::Safetensors(st) => {
                // Every tensor of a one-file store shares one map: the lowest
                // address is at most the start of its data.
                st.values().map(|t| t.data.as_ptr() as usize).min().unwrap()
                    - (size - st.values().map(|t| t.data.len()).sum::<usize>())
            }
            _ => unreachable!(),
        };
        let p = inner.as_ptr() as usize;
        p >= start && p + inner.len() <= start + size
    }

    #[test]
    fn stored_blocks_and_bf16_are_read_in_place_from_the_memory_map() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (64, 64), &dev).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let bf16 = QTensor::quantize(&w, GgmlDType::BF16).unwrap();
        let meta = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.vocab_size", Value::U32(64)),
            ("llama.embedding_length", Value::U32(64)),
            ("llama.feed_forward_length", Value::U32(64)),
            ("llama.block_count", Value::U32(1)),
            ("llama.attention.head_count", Value::U32(4)),
        ];
        let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let gguf = dir.path().join("m.gguf");
        gguf_file::write(
            &mut std::fs::File::create(&gguf).unwrap(),
            &meta,
            &[
                ("blk.0.attn_q.weight", &q8),
                ("blk.0.ffn_up.weight", &bf16),
                ("token_embd.weight", &q8),
            ],
        )
        .unwrap();
        let weights = Weights::open(std::slice::from_ref(&gguf)).unwrap();
        assert_eq!(weights.rope_layout(), RopeLayout::AdjacentPairs);
        let shape = [64, 64];
        for (name, dtype) in [
            ("model.layers.0.self_attn.q_proj.weight", DType::F32),
            ("model.layers.0.mlp.up_proj.weight", DType::BF16),
        ] {
            let m = weights.linear(name, &shape, dtype, &dev, false).unwrap();
            let bytes = m.kernel_bytes().expect("read by this crate's kernels");
            assert!(in_file(bytes, &gguf, &weights), "{name} was copied");
        }
        let table = weights
            .embedding("model.embed_tokens.weight", &shape, DType::F32, &dev)
            .unwrap();
        assert!(matches!(table, Embedding::CpuQuantized(_)));
        // Asking for another format is a conversion: a copy.
        let f32 = weights
            .linear(
                "model.layers.0.mlp.up_proj.weight",
                &shape,
                DType::F32,
                &dev,
                false,
            )
            .unwrap();
        assert!(f32.kernel_bytes().is_none());

        let st = dir.path().join("m.safetensors");
        let data = bf16.data().unwrap().into_owned();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![64, 64], &data)
                .unwrap();
        safetensors::serialize_to_file([("w", view)], None, &st).unwrap();
        let weights = Weights::open(std::slice::from_ref(&st)).unwrap();
        assert_eq!(weights.rope_layout(), RopeLayout::Halves);
        let m = weights
            .linear("w", &shape, DType::BF16, &dev, false)
            .unwrap();
        assert!(in_file(m.kernel_bytes().unwrap(), &st, &weights), "copied");
        // The same numbers as the copying path.
        let x = Tensor::randn(0f32, 1.0, (3, 64), &dev).unwrap();
        let copied =
            Linear::dense(weights.tensor("w", &shape, DType::BF16, &dev).unwrap()).unwrap();
        assert!(
            copied
                .kernel_bytes()
                .is_some_and(|b| !in_file(b, &st, &weights))
        );
        let diff = (m.forward(&x).unwrap() - copied.forward(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }
}
