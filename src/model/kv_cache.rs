//! The key/value cache of every layer.
//!
//! candle-nn's caches either concatenate (copying the whole cache every
//! token) or are fixed-size with no way back to a prefix. This one keeps one
//! buffer per layer, `[kv_heads, capacity, head_dim]`, writes new positions in
//! place, grows by doubling (amortised O(1) per token), and can be truncated
//! to any prefix, which is what lets a chat turn feed only its new tokens.
//! Readers get a strided view of the live positions: no copy.

use anyhow::{Result, ensure};
use candle_core::{DType, Device, Tensor};

/// Growth granularity: capacities are multiples of this many positions.
const CHUNK: usize = 256;

pub struct KvCache {
    /// Per-layer buffers, allocated on the first `reserve`.
    layers: Vec<(Tensor, Tensor)>,
    num_layers: usize,
    len: usize,
    capacity: usize,
    max_len: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    /// The first position whose keys were rotated with rescaled
    /// frequencies (dynamic RoPE scaling past the original context), or
    /// `usize::MAX`: such keys are right only for the pass that wrote them.
    rescaled_from: usize,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            layers: Vec::with_capacity(num_layers),
            num_layers,
            len: 0,
            capacity: 0,
            max_len,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
            rescaled_from: usize::MAX,
        }
    }

    /// Positions currently held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position from `len` on; the buffers stay allocated.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        if self.rescaled_from >= self.len {
            self.rescaled_from = usize::MAX;
        }
    }

    /// Where the keys rotated with rescaled frequencies begin (`None`: none are).
    pub fn rescaled_from(&self) -> Option<usize> {
        (self.rescaled_from != usize::MAX).then_some(self.rescaled_from)
    }

    /// Records that positions from `pos` on were written with rescaled frequencies.
    pub(crate) fn mark_rescaled(&mut self, pos: usize) {
        self.rescaled_from = self.rescaled_from.min(pos);
    }

    /// Makes room for `extra` more positions, growing every layer's buffer if needed.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        ensure!(
            needed <= self.max_len,
            "the context is full: {needed} positions needed, the model holds {}",
            self.max_len
        );
        if needed <= self.capacity {
            return Ok(());
        }
        let grown = (self.capacity * 2).max(needed).div_ceil(CHUNK) * CHUNK;
        let new_capacity = grown.min(self.max_len).max(needed);
        let extra_rows = new_capacity - self.capacity;
        if self.layers.is_empty() {
            for _ in 0..self.num_layers {
                let k = Tensor::zeros(
                    (self.kv_heads, new_capacity, self.head_dim),
                    self.dtype,
                    &self.device,
                )?;
                let v = Tensor::zeros(
                    (self.kv_heads, new_capacity, self.head_dim),
                    self.dtype,
                    &self.device,
                )?;
                self.layers.push((k, v));
            }
            self.capacity = new_capacity;
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut() {
            let pad = Tensor::zeros(
                (self.kv_heads, extra_rows, self.head_dim),
                self.dtype,
                &self.device,
            )?;
            *k = Tensor::cat(&[&*k, &pad], 1)?;
            *v = Tensor::cat(&[&*v, &pad], 1)?;
        }
        self.capacity = new_capacity;
        Ok(())
    }

    /// Writes `k`, `v` (`[kv_heads, seq, head_dim]`, contiguous) for `layer` at
    /// the current end. The caller reserves first and commits after all layers.
    pub(crate) fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(&k.to_dtype(self.dtype)?, 1, self.len)?;
        vc.slice_set(&v.to_dtype(self.dtype)?, 1, self.len)?;
        Ok(())
    }

    /// The positions `start..end` of `layer`, as views into the buffers.
    pub(crate) fn view(&self, layer: usize, start: usize, end: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = &self.layers[layer];
        Ok((
            k.narrow(1, start, end - start)?,
            v.narrow(1, start, end - start)?,
        ))
    }

    /// Runs `f` over layer `layer`'s positions `start..end` (written, not
    /// necessarily committed yet) read in place
    /// (the decode attention kernel); `None` when the buffers are not CPU
    /// f32 or f16 storage.
    pub(crate) fn with_view<R>(
        &self,
        layer: usize,
        start: usize,
        end: usize,
        f: impl FnOnce(crate::kernels::attention::CacheView<'_>) -> R,
    ) -> Option<R> {
        use crate::kernels::attention::{CacheView, KvBuf};
        use candle_core::{CpuStorage, Storage};
        let (k, v) = self.layers.get(layer)?;
        // Up to the capacity: a pass reads the positions it has just written
        // before they are committed.
        if end > self.capacity || start > end {
            return None;
        }
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        if !kl.is_contiguous() || !vl.is_contiguous() {
            return None;
        }
        let (ko, vo, n) = (kl.start_offset(), vl.start_offset(), k.elem_count());
        let (k, v) = match (&*ks, &*vs) {
            (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => (
                KvBuf::F32(k.get(ko..ko + n)?),
                KvBuf::F32(v.get(vo..vo + n)?),
            ),
            (Storage::Cpu(CpuStorage::F16(k)), Storage::Cpu(CpuStorage::F16(v))) => (
                KvBuf::F16(k.get(ko..ko + n)?),
                KvBuf::F16(v.get(vo..vo + n)?),
            ),
            _ => return None,
        };
        Some(f(CacheView {
            k,
            v,
            capacity: self.capacity,
            start,
            end,
        }))
    }

    /// Makes this cache hold a copy of `other`'s first `len` positions (a
    /// forked prompt: copied, not recomputed).
    pub(crate) fn copy_from(&mut self, other: &KvCache, len: usize) -> Result<()> {
        ensure!(len <= other.len, "copying {len} positions of {}", other.len);
        self.len = 0;
        self.rescaled_from = usize::MAX;
        if len == 0 {
            return Ok(());
        }
        self.reserve(len)?;
        for layer in 0..self.num_layers {
            let (k, v) = other.view(layer, 0, len)?;
            let (kc, vc) = &self.layers[layer];
            kc.slice_set(&k.contiguous()?, 1, 0)?;
            vc.slice_set(&v.contiguous()?, 1, 0)?;
        }
        self.len = len;
        if other.rescaled_from < len {
            self.rescaled_from = other.rescaled_from;
        }
        Ok(())
    }

    /// Marks `n` freshly written positions as live.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(kv: usize, seq: usize, d: usize, base: f32) -> Tensor {
        let data: Vec<f32> = (0..kv * seq * d).map(|i| base + i as f32).collect();
        Tensor::from_vec(data, (kv, seq, d), &Device::Cpu).unwrap()
    }

    #[test]
    fn grows_keeps_contents_and_truncates() -> Result<()> {
        let mut cache = KvCache::new(1, 2, 4, 1000, DType::F32, &Device::Cpu);
        let a = filled(2, 3, 4, 0.0);
        cache.reserve(3)?;
        cache.write(0, &a, &a)?;
        cache.commit(3);
        // Force growth past the first chunk: the old positions must survive it.
        let b = filled(2, 300, 4, 1000.0);
        cache.reserve(300)?;
        cache.write(0, &b, &b)?;
        cache.commit(300);
        assert_eq!(cache.len(), 303);
        let (k, _) = cache.view(0, 0, 3)?;
        assert_eq!(
            k.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
            a.flatten_all()?.to_vec1::<f32>()?
        );
        let (k, _) = cache.view(0, 3, 303)?;
        assert_eq!(
            k.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?
        );
        cache.truncate(2);
        assert_eq!(cache.len(), 2);
        Ok(())
    }

    #[test]
    fn rescaled_keys_are_forgotten_with_their_positions() {
        let mut cache = KvCache::new(1, 1, 2, 64, DType::F32, &Device::Cpu);
        cache.reserve(10).unwrap();
        cache.commit(10);
        assert_eq!(cache.rescaled_from(), None);
        cache.mark_rescaled(6);
        cache.mark_rescaled(8);
        assert_eq!(cache.rescaled_from(), Some(6));
        cache.truncate(7);
        assert_eq!(cache.rescaled_from(), Some(6));
        let mut copy = KvCache::new(1, 1, 2, 64, DType::F32, &Device::Cpu);
        copy.copy_from(&cache, 7).unwrap();
        assert_eq!(copy.rescaled_from(), Some(6));
        copy.copy_from(&cache, 5).unwrap();
        assert_eq!(copy.rescaled_from(), None);
        cache.truncate(6);
        assert_eq!(cache.rescaled_from(), None);
    }

    #[test]
    fn refuses_to_outgrow_the_context() {
        let mut cache = KvCache::new(1, 1, 2, 8, DType::F32, &Device::Cpu);
        cache.reserve(8).unwrap();
        cache.commit(8);
        let err = cache.reserve(1).unwrap_err().to_string();
        assert!(err.contains("9 positions needed"), "{err}");
    }
}
