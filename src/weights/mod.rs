//! Safetensors checkpoints, single-file or sharded, memory-mapped, handed to
//! the model one named tensor at a time with its shape checked.
//!
//! candle's VarBuilder would do the lookup, but its errors name neither the
//! file nor both shapes in a sentence a user can act on; this thin layer over
//! candle's `MmapedSafetensors` does.

use anyhow::{Context, Result, bail};
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub struct Weights {
    tensors: MmapedSafetensors,
    files: Vec<PathBuf>,
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
        // SAFETY: the files are mapped read-only; like every mmap-based loader
        // (candle, safetensors, llama.cpp) we assume nobody truncates them while
        // the model runs.
        let tensors = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file (truncated or corrupt?): {e}",
                describe(files)
            )
        })?;
        Ok(Self {
            tensors,
            files: files.to_vec(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }

    /// The dtype most tensors are stored in (the checkpoint's own precision).
    pub fn stored_dtype(&self) -> Option<DType> {
        let mut counts = std::collections::HashMap::new();
        for (_, view) in self.tensors.tensors() {
            if let Ok(dtype) = DType::try_from(view.dtype()) {
                *counts.entry(dtype).or_insert(0usize) += 1;
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
        let view = self.tensors.get(name).map_err(|_| {
            anyhow::anyhow!("tensor {name} is missing from {}", describe(&self.files))
        })?;
        if view.shape() != shape {
            bail!(
                "tensor {name} has shape {:?}, expected {:?} from config.json",
                view.shape(),
                shape
            );
        }
        let tensor = view
            .load(device)
            .with_context(|| format!("loading tensor {name}"))?;
        Ok(tensor.to_dtype(dtype)?)
    }
}

fn describe(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        many => format!(
            "{} shards in {}",
            many.len(),
            many[0].parent().unwrap_or(Path::new(".")).display()
        ),
    }
}
