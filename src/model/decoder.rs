//! The Llama/Mistral decoder: RMSNorm, rotary embeddings, grouped-query
//! attention with an optional sliding window, SiLU MLP, untied `lm_head`.
//!
//! Written here rather than taken from candle-transformers because its
//! mistral.rs lets a query see W+1 keys in prefill and ignores the window
//! when decoding with a cache, its cache concatenates (copying everything
//! every token), and its `repeat_kv` copies the cache once per query group.
//! Here queries are regrouped instead (`[kv_heads, n_rep*seq, d]`), so
//! attention reads the cache as a strided view, for every dtype and device.

use super::config::{Config, RopeScaling};
use super::kv_cache::KvCache;
use super::linear::{Embedding, Linear, dense_bytes};
use crate::kernels::RowClass;
use crate::weights::Weights;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: `[vocab]` (what generation needs).
    Last,
    /// Every fed position: `[seq, vocab]` (for verification).
    All,
}

/// Which dimensions of a head rope rotates together, as the rows of
/// `q_proj`/`k_proj` are laid out. The two differ by a permutation of each
/// head's rows applied to queries and keys alike, so attention scores are
/// the same; only rope must match the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// transformers' `rotate_half`: dimension `i` with `i + head_dim/2`.
    Halves,
    /// llama.cpp's GGUF layout (its converter permutes the rows so):
    /// dimension `2i` with `2i + 1`, at the same frequency `i`.
    AdjacentPairs,
}

/// Prompts are fed in chunks of this many positions so the attention scores
/// (`heads × chunk × context` floats) stay bounded for long prompts.
pub const PREFILL_CHUNK: usize = 512;

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Biases of q, k, v, o (`[out]`), where the family has them.
    bias: [Option<Tensor>; 4],
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// `silu(gate) * up`, the SwiGLU of the Llama/Mistral MLP (Shazeer 2020,
/// "GLU Variants Improve Transformer"), written over `gate` in place for
/// contiguous CPU f32 tensors: the fresh output of the gate projection is
/// not needed afterwards, and a third `[rows, intermediate]` tensor (59 MB
/// at a 1024-row prompt step of a 7B) would raise the step's peak memory.
/// Each element is `g / (1 + exp(-g)) * u`, the same operations in the
/// same order as candle's `silu` then `mul` (as built here, without its
/// mkl/accelerate features), so the result is bitwise theirs; other
/// devices and dtypes take candle's two ops.
///
/// `gate` must own its storage (a projection's fresh output): a clone or a
/// view of another tensor would be overwritten with it.
fn silu_mul(gate: Tensor, up: &Tensor) -> Result<Tensor> {
    struct SiluMul;
    impl candle_core::InplaceOp2 for SiluMul {
        fn name(&self) -> &'static str {
            "silu-mul"
        }
        fn cpu_fwd(
            &self,
            g: &mut candle_core::CpuStorage,
            gl: &candle_core::Layout,
            u: &candle_core::CpuStorage,
            ul: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            use candle_core::CpuStorage::F32;
            let (F32(g), F32(u)) = (g, u) else {
                candle_core::bail!("silu-mul takes f32 tensors");
            };
            let (Some((g0, g1)), Some((u0, u1))) =
                (gl.contiguous_offsets(), ul.contiguous_offsets())
            else {
                candle_core::bail!("silu-mul takes contiguous tensors");
            };
            if g1 - g0 != u1 - u0 {
                candle_core::bail!("silu-mul of {} and {} values", g1 - g0, u1 - u0);
            }
            // On every thread of the pool: one `exp` per value, 3.7 million
            // a step at eight sequences of a 7B, was 3% of the step on the
            // caller alone while the other threads waited.
            const PER_TASK: usize = 8192;
            let u = &u[u0..u1];
            crate::kernels::pool::for_each_chunk_mut(&mut g[g0..g1], PER_TASK, |task, g| {
                let u = &u[task * PER_TASK..task * PER_TASK + g.len()];
                for (g, &u) in g.iter_mut().zip(u) {
                    *g = *g / (1.0 + (-*g).exp()) * u;
                }
            });
            Ok(())
        }
    }
    let in_place = gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.shape() == up.shape()
        && gate.is_contiguous()
        && up.is_contiguous();
    if in_place {
        gate.inplace_op2(up, &SiluMul)?;
        return Ok(gate);
    }
    let silu = candle_nn::ops::silu(&gate)?;
    drop(gate);
    Ok((silu * up)?)
}

struct Layer {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

pub struct Model {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// Whether `lm_head` shares the embedding's storage.
    tied: bool,
    /// Rope's cos/sin `[n, head_dim/2]` at the default (or fixed-scaled)
    /// frequencies for the first `n` positions (`ROPE_TABLE_BYTES` at most:
    /// a file's context length times its head size is not a size to
    /// allocate at load); positions past them are computed when fed.
    cos: Tensor,
    sin: Tensor,
    /// The frequencies the tables hold, for the positions past them.
    inv_freq: Vec<f32>,
    /// Dynamic NTK scaling's inputs: a pass past the original context
    /// computes its own frequencies.
    dynamic: Option<DynamicRope>,
    rope_layout: RopeLayout,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    window: Option<usize>,
    max_len: usize,
    dtype: DType,
    kv_dtype: DType,
    device: Device,
}

/// Where a checkpoint keeps its tensors, and which head it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The prefix of the decoder's tensors (`model` for `model.layers.0...`).
    pub trunk: String,
    pub head: Head,
}

/// What the final-norm hidden states are multiplied by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// `lm_head.weight` `[vocab, hidden]` (or the tied embedding): logits.
    Lm,
    /// `v_head.weight` `[1, hidden]`, no bias: a reward model's value head
    /// (Starling-RM; Zhu et al. 2023), one number per position.
    Value,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            trunk: "model".into(),
            head: Head::Lm,
        }
    }
}

impl Model {
    /// A causal LM as transformers names its tensors (`model.*`, `lm_head`).
    pub fn load(config: &Config, weights: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_layout(config, weights, dtype, device, &Layout::default())
    }

    /// A decoder whose tensors sit under `layout.trunk`, with `layout.head`
    /// on top (its output width is `vocab` for `Lm`, 1 for `Value`).
    pub fn load_layout(
        config: &Config,
        weights: &Weights,
        dtype: DType,
        device: &Device,
        layout: &Layout,
    ) -> Result<Self> {
        let trunk = &layout.trunk;
        let h = config.hidden_size;
        let heads = config.num_attention_heads;
        let kv_heads = config.num_kv_heads();
        let hd = config.head_dim();
        let inter = config.intermediate_size;
        let vocab = config.vocab_size;
        // bf16 on the CPU: matrices stay bf16 (this crate's kernel), the
        // activations, norms and cache run in f32 (candle has no CPU bf16 matmul).
        let weight_dtype = dtype;
        let dtype = if device.is_cpu() && dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        };
        let get = |name: &str, shape: &[usize]| weights.tensor(name, shape, dtype, device);
        let mat =
            |name: &str, shape: &[usize]| weights.linear(name, shape, weight_dtype, device, false);

        let embed = weights.embedding(
            &format!("{trunk}.embed_tokens.weight"),
            &[vocab, h],
            weight_dtype,
            device,
        )?;
        // A checkpoint with more layers than the config says would run
        // silently truncated: refuse it.
        let n = config.num_hidden_layers;
        let layers_prefix = format!("{trunk}.layers.");
        let beyond = weights
            .names()
            .iter()
            .filter_map(|name| {
                name.strip_prefix(&layers_prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|&l| l >= n)
            .max()
            .or_else(|| {
                weights
                    .contains(&format!("{trunk}.layers.{n}.input_layernorm.weight"))
                    .then_some(n)
            });
        if let Some(l) = beyond {
            anyhow::bail!(
                "the weights have a layer {l} but the config says num_hidden_layers is {n}: the config does not describe these weights"
            );
        }
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("{trunk}.layers.{l}");
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                attn: Attention {
                    q: mat(&format!("{p}.self_attn.q_proj.weight"), &[heads * hd, h])?,
                    k: mat(&format!("{p}.self_attn.k_proj.weight"), &[kv_heads * hd, h])?,
                    v: mat(&format!("{p}.self_attn.v_proj.weight"), &[kv_heads * hd, h])?,
                    o: mat(&format!("{p}.self_attn.o_proj.weight"), &[h, heads * hd])?,
                    bias: {
                        let outs = [heads * hd, kv_heads * hd, kv_heads * hd, h];
                        let mut bias = [None, None, None, None];
                        for (i, (name, has)) in ["q", "k", "v", "o"]
                            .iter()
                            .zip(config.attention_biases())
                            .enumerate()
                        {
                            if has {
                                let b = format!("{p}.self_attn.{name}_proj.bias");
                                bias[i] = Some(weights.bias(&b, outs[i], dtype, device)?);
                            }
                        }
                        bias
                    },
                },
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate: mat(&format!("{p}.mlp.gate_proj.weight"), &[inter, h])?,
                    up: mat(&format!("{p}.mlp.up_proj.weight"), &[inter, h])?,
                    down: mat(&format!("{p}.mlp.down_proj.weight"), &[h, inter])?,
                },
            });
        }
        let norm = get(&format!("{trunk}.norm.weight"), &[h])?;
        let tied = layout.head == Head::Lm
            && !weights.contains("lm_head.weight")
            && config.tie_word_embeddings;
        let lm_head = match layout.head {
            // One row: kept dense, whatever --quantize says (it is 1/vocab of a head).
            Head::Value => Linear::dense(get("v_head.weight", &[1, h])?)?,
            Head::Lm if tied => embed.tied_head()?,
            Head::Lm => {
                weights.linear("lm_head.weight", &[vocab, h], weight_dtype, device, true)?
            }
        };
        let f32_weights = layers.first().is_none_or(|l| l.mlp.up.format() == "F32");
        let scaling = config.rope_scaling()?;
        let max_len = config.context_len()?;
        let (inv_freq, cos, sin) = rope_tables(
            hd,
            config.rope_theta,
            scaling,
            config.rope_freq_factors.as_deref(),
            max_len,
            dtype,
            device,
        )?;
        let dynamic = match scaling {
            RopeScaling::Dynamic { factor, original } => {
                anyhow::ensure!(
                    config.rope_freq_factors.is_none(),
                    "dynamic rope scaling with per-frequency factors is not supported"
                );
                Some(DynamicRope {
                    theta: config.rope_theta,
                    factor,
                    original,
                })
            }
            _ => None,
        };
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            tied,
            cos,
            sin,
            dynamic,
            rope_layout: weights.rope_layout(),
            heads,
            kv_heads,
            head_dim: hd,
            eps: config.rms_norm_eps as f32,
            window: config.window(),
            max_len,
            inv_freq,
            dtype,
            // Quantized and half-precision weights get an f16 cache on the
            // CPU (llama.cpp's default: half the memory; decode attention
            // reads it in place); f32 weights keep f32, so the goldens hold.
            kv_dtype: if device.is_cpu() && dtype == DType::F32 && !f32_weights {
                DType::F16
            } else {
                dtype
            },
            device: device.clone(),
        })
    }

    /// The KV cache's dtype: f16 (the default for quantized and
    /// half-precision weights on the CPU, as llama.cpp's) halves its memory;
    /// f32 (the default for f32 weights) keeps exactly the f32 computation.
    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// Sets the dtype of the caches made from now on.
    pub fn set_kv_dtype(&mut self, dtype: DType) {
        self.kv_dtype = dtype;
    }

    /// An empty cache sized for this model's context.
    pub fn new_cache(&self) -> KvCache {
        self.new_cache_of(self.max_len)
    }

    /// An empty cache that holds at most `positions` (capped at the model's
    /// context); its memory grows as it fills.
    pub fn new_cache_of(&self, positions: usize) -> KvCache {
        KvCache::new(
            self.layers.len(),
            self.kv_heads,
            self.head_dim,
            positions.min(self.max_len),
            self.kv_dtype,
            &self.device,
        )
    }

    /// Bytes of KV cache one position takes (keys and values, every layer).
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.layers.len() * self.kv_heads * self.head_dim * self.kv_dtype.size_in_bytes()
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Where the weights and the KV caches live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of activations.
    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of all weights as held in memory (a tied `lm_head` counts once).
    pub fn weight_bytes(&self) -> usize {
        let head = if self.tied { 0 } else { self.lm_head.bytes() };
        self.embed.bytes() + self.layer_bytes() + dense_bytes(&self.norm) + head
    }

    /// Bytes of weights one decode step reads: every matrix multiplied per
    /// token (seven per layer and the output head, tied or not), the norms;
    /// not the embedding table, of which a step reads one row.
    pub fn streamed_bytes_per_token(&self) -> usize {
        self.layer_bytes() + self.lm_head.bytes() + dense_bytes(&self.norm)
    }

    /// Bytes of every layer's seven matrices and two norms.
    fn layer_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.attn, &l.mlp);
                [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down]
                    .iter()
                    .map(|w| w.bytes())
                    .sum::<usize>()
                    + dense_bytes(&l.input_norm)
                    + dense_bytes(&l.post_norm)
            })
            .sum()
    }

    /// How the matrices are stored (`F32`, `Q4K`, ...), from the first MLP's.
    pub fn weight_format(&self) -> String {
        self.layers
            .first()
            .map(|l| l.mlp.up.format())
            .unwrap_or_else(|| format!("{:?}", self.dtype))
    }

    /// Feeds the prompt positions `ids` after what `cache` holds and
    /// returns the logits asked for, in f32. Prompt rows take the prompt
    /// kernels (see [`Chunk::prompt`]); a generated token goes through
    /// [`Model::forward_token`].
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        self.feed(ids, cache, which, true)
    }

    /// Feeds one generated token (a decode row: the row kernels) after what
    /// `cache` holds and returns the next position's logits `[vocab]`, in f32.
    pub fn forward_token(&self, id: u32, cache: &mut KvCache) -> Result<Tensor> {
        self.feed(&[id], cache, Logits::Last, false)
    }

    fn feed(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        which: Logits,
        prompt: bool,
    ) -> Result<Tensor> {
        anyhow::ensure!(!ids.is_empty(), "forward needs at least one token");
        cache.reserve(ids.len())?;
        // The whole call is one pass for rope (transformers' seq_len).
        let seq_len = cache.len() + ids.len();
        let mut outputs = Vec::new();
        let mut last = None;
        for chunk in ids.chunks(PREFILL_CHUNK) {
            let (hidden, _) = self.forward_hidden(&mut [Chunk {
                ids: chunk,
                cache: &mut *cache,
                logits: true,
                seq_len,
                prompt,
            }])?;
            match which {
                Logits::All => outputs.push(self.head(&hidden, RowClass::Prompt)?),
                Logits::Last => last = Some(hidden),
            }
        }
        match which {
            Logits::All => Ok(Tensor::cat(&outputs, 0)?),
            Logits::Last => {
                let hidden = last.expect("at least one chunk");
                let n = hidden.dim(0)?;
                Ok(self
                    .head(&hidden.narrow(0, n - 1, 1)?, RowClass::Rows)?
                    .squeeze(0)?)
            }
        }
    }

    /// One pass over the weights for the chunks of many sequences: each
    /// chunk's ids follow what its own cache holds (its own positions,
    /// attending only to its own keys), and every matrix multiplies all
    /// the chunks' rows at once, so each weight block is read once per
    /// step whatever the batch. Returns `[chunks with logits, vocab]` in
    /// f32 (`None` when no chunk asks): the logits of the last position of
    /// each chunk that asks, in the batch's order.
    ///
    /// Errors when a chunk is empty or its cache cannot hold it; then no
    /// cache has committed anything.
    pub fn forward_batch(&self, batch: &mut [Chunk<'_>]) -> Result<Option<Tensor>> {
        let (hidden, segments) = self.forward_hidden(batch)?;
        let rows: Vec<u32> = batch
            .iter()
            .zip(&segments)
            .filter(|(c, _)| c.logits)
            .map(|(_, s)| (s.start + s.seq - 1) as u32)
            .collect();
        if rows.is_empty() {
            return Ok(None);
        }
        let last = if rows.len() == hidden.dim(0)?
            && rows.iter().enumerate().all(|(i, &r)| r == i as u32)
        {
            hidden
        } else {
            let index = Tensor::from_vec(rows.clone(), rows.len(), &self.device)?;
            hidden.index_select(&index, 0)?
        };
        // One row per sequence, as alone: the row kernels.
        Ok(Some(self.head(&last, RowClass::Rows)?))
    }

    fn head(&self, hidden: &Tensor, class: RowClass) -> Result<Tensor> {
        let x = candle_nn::ops::rms_norm(hidden, &self.norm, self.eps)?;
        Ok(self.lm_head.forward_as(&x, class)?.to_dtype(DType::F32)?)
    }

    /// Runs the chunks through every layer, writing their keys and values
    /// to their caches; returns the final hidden states `[rows, hidden]`
    /// before the norm, and where each chunk's rows are in it.
    ///
    /// The decode rows (generated tokens) come first and take the row
    /// kernels; the prompt chunks follow and take the prompt kernels: every
    /// row goes through the same kernels whatever shares the step and
    /// however its prompt was cut, so its result depends on neither.
    fn forward_hidden(&self, batch: &mut [Chunk<'_>]) -> Result<(Tensor, Vec<Segment>)> {
        for chunk in batch.iter_mut() {
            anyhow::ensure!(!chunk.ids.is_empty(), "forward needs at least one token");
            chunk.cache.reserve(chunk.ids.len())?;
        }
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&c| batch[c].prompt);
        let short_rows: usize = batch
            .iter()
            .filter(|c| !c.prompt)
            .map(|c| c.ids.len())
            .sum();
        let ids: Vec<u32> = order
            .iter()
            .flat_map(|&c| batch[c].ids.iter().copied())
            .collect();
        let x = self.embed.forward(&ids, self.dtype, &self.device)?;
        let mut starts = vec![0; batch.len()];
        let mut start = 0;
        for &c in &order {
            starts[c] = start;
            start += batch[c].ids.len();
        }
        let mut segments = Vec::with_capacity(batch.len());
        for (chunk, &start) in batch.iter().zip(&starts) {
            let (seq, pos) = (chunk.ids.len(), chunk.cache.len());
            // Keys visible to the first query of the chunk; later ones see a subset.
            let kv_start = self.first_key(pos);
            let kv_end = pos + seq;
            let (cos, sin, rescaled) = self.rope_rows(pos, seq, chunk.seq_len.max(kv_end))?;
            segments.push(Segment {
                start,
                seq,
                cos,
                sin,
                rescaled,
                kv_start,
                kv_end,
                mask: std::cell::OnceCell::new(),
                write: true,
            });
        }
        let decode_rope = self.decode_rope(&segments, &order, short_rows)?;
        let x = self.layers_forward(
            x,
            &segments,
            &order,
            short_rows,
            decode_rope.as_ref(),
            batch,
        )?;
        for (chunk, segment) in batch.iter_mut().zip(&segments) {
            if segment.rescaled {
                chunk.cache.mark_rescaled(chunk.cache.len());
            }
            chunk.cache.commit(chunk.ids.len());
        }
        Ok((x, segments))
    }

    /// The head's output `[out]` (f32) for one extra token `id` at
    /// `position`, attending to every key `cache` holds but not to itself,
    /// and leaving the cache as it was.
    ///
    /// This is what a right-padded batch computes at a pad position whose
    /// attention mask is 0: Starling-RM-7B-alpha's model card reads the
    /// reward at position 2047 of its input padded with `<unk>`, and this
    /// gives that number from the real tokens' cache in one row instead of
    /// running 2048.
    ///
    /// Errors when the cache is empty or `position` is outside the context
    /// or not after what the cache holds.
    pub fn probe(&self, id: u32, position: usize, cache: &mut KvCache) -> Result<Tensor> {
        let held = cache.len();
        anyhow::ensure!(held > 0, "a probe needs a prompt in the cache");
        anyhow::ensure!(
            position >= held && position < self.max_len,
            "probe position {position} is not between the {held} cached positions and the context of {}",
            self.max_len
        );
        let kv_start = self.first_key(position).min(held);
        let (cos, sin, rescaled) = self.rope_rows(position, 1, position + 1)?;
        let segments = [Segment {
            start: 0,
            seq: 1,
            cos,
            sin,
            rescaled,
            kv_start,
            kv_end: held,
            mask: std::cell::OnceCell::from(None),
            write: false,
        }];
        let ids = [id];
        let mut batch = [Chunk {
            ids: &ids,
            cache,
            logits: true,
            seq_len: position + 1,
            prompt: false,
        }];
        let x = self.embed.forward(&ids, self.dtype, &self.device)?;
        let x = self.layers_forward(x, &segments, &[0], 1, None, &mut batch)?;
        Ok(self.head(&x, RowClass::Rows)?.squeeze(0)?)
    }

    /// Every layer over the batch's rows `x` `[rows, hidden]`.
    fn layers_forward(
        &self,
        mut x: Tensor,
        segments: &[Segment],
        order: &[usize],
        short_rows: usize,
        decode_rope: Option<&(Tensor, Tensor)>,
        batch: &mut [Chunk<'_>],
    ) -> Result<Tensor> {
        for (l, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, self.eps)?;
            let h = self.attention(
                l,
                &layer.attn,
                &h,
                segments,
                order,
                short_rows,
                decode_rope,
                batch,
            )?;
            let x1 = (residual + h)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.post_norm, self.eps)?;
            let mlp = &layer.mlp;
            // The up projection is freed, and the gate's buffer holds the
            // product, before the down projection runs: at a prompt step
            // of 1024 rows each is 59 MB.
            let gated = {
                let [gate, up] = Linear::forward_split_each([&mlp.gate, &mlp.up], &h, short_rows)?;
                silu_mul(gate, &up)?
            };
            drop(h);
            let h = mlp.down.forward_split(&gated, short_rows)?;
            x = (x1 + h)?;
        }
        Ok(x)
    }

    /// On candle's path (not the CPU's f32 kernels), with two or more
    /// decode rows (the first `short_rows` rows, one per sequence, first in
    /// `order`): their rope rows `[n, 1, head_dim/2]`, cos and sin, for one
    /// rope launch over all of them. `None` otherwise.
    fn decode_rope(
        &self,
        segments: &[Segment],
        order: &[usize],
        short_rows: usize,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let cpu_f32 = self.dtype == DType::F32 && self.device.is_cpu();
        if cpu_f32 || short_rows < 2 || order.len() < short_rows {
            return Ok(None);
        }
        let decode = &order[..short_rows];
        if decode
            .iter()
            .any(|&c| segments[c].seq != 1 || !segments[c].write)
        {
            return Ok(None);
        }
        let half = self.head_dim / 2;
        let rows = |f: fn(&Segment) -> &Tensor| -> Result<Tensor> {
            let parts: Vec<&Tensor> = decode.iter().map(|&c| f(&segments[c])).collect();
            Ok(Tensor::cat(&parts, 0)?.reshape((short_rows, 1, half))?)
        };
        Ok(Some((rows(|s| &s.cos)?, rows(|s| &s.sin)?)))
    }

    /// The first key the query at position `p` sees: with a window W, keys
    /// `p - W < k <= p`, as transformers' mask (mistral.rs lets W+1 in).
    fn first_key(&self, p: usize) -> usize {
        self.window.map_or(0, |w| (p + 1).saturating_sub(w))
    }

    /// Additive mask `[seq, kv_end - kv_start]`: query at `pos + i` sees key `k`
    /// iff `first_key(pos + i) <= k <= pos + i`. `None` when every query sees
    /// every key in range.
    fn mask(
        &self,
        pos: usize,
        seq: usize,
        kv_start: usize,
        kv_end: usize,
    ) -> Result<Option<Tensor>> {
        if seq == 1 {
            // The single query is the last position and kv_start already applies the window.
            return Ok(None);
        }
        let kv_len = kv_end - kv_start;
        let mut data = vec![0f32; seq * kv_len];
        for i in 0..seq {
            let p = pos + i;
            for j in 0..kv_len {
                let k = kv_start + j;
                let hidden = k > p || k < self.first_key(p);
                if hidden {
                    data[i * kv_len + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(data, (seq, kv_len), &self.device)?))
    }

    /// Attention for every chunk of the batch: the projections run once
    /// over all rows (`short_rows` of them first, through the row
    /// kernels); rope, the cache and the scores per chunk, in row order,
    /// except that with `decode_rope` (candle's path, see `decode_rope`)
    /// the decode rows are roped in one call.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        w: &Attention,
        x: &Tensor,
        segments: &[Segment],
        order: &[usize],
        short_rows: usize,
        decode_rope: Option<&(Tensor, Tensor)>,
        batch: &mut [Chunk<'_>],
    ) -> Result<Tensor> {
        let with_bias = |y: Tensor, b: &Option<Tensor>| -> Result<Tensor> {
            Ok(match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        };
        let [q_all, k_all, v_all] = Linear::forward_split_each([&w.q, &w.k, &w.v], x, short_rows)?;
        let q_all = with_bias(q_all, &w.bias[0])?;
        let k_all = with_bias(k_all, &w.bias[1])?;
        let v_all = with_bias(v_all, &w.bias[2])?;
        let mut outs = Vec::with_capacity(segments.len());
        let mut order = order;
        if let Some((cos, sin)) = decode_rope {
            // candle's path (CUDA, f16): the decode rows' heads and rope in
            // one launch each for all of them, instead of one per sequence
            // (a 7B at 32 sequences on an H200 spent its steps launching
            // kernels); each row then attends over its own cache.
            let (n, hd) = (cos.dim(0)?, self.head_dim);
            let heads = |t: &Tensor, h: usize| -> Result<Tensor> {
                Ok(t.narrow(0, 0, n)?.reshape((n, h, 1, hd))?)
            };
            let q = self.rope(&heads(&q_all, self.heads)?, cos, sin)?;
            let k = self.rope(&heads(&k_all, self.kv_heads)?, cos, sin)?;
            let v = heads(&v_all, self.kv_heads)?;
            for (i, &c) in order[..n].iter().enumerate() {
                outs.push(self.attend_roped(
                    layer,
                    q.get(i)?,
                    k.get(i)?,
                    v.get(i)?,
                    &segments[c],
                    batch[c].cache,
                )?);
            }
            order = &order[n..];
        }
        for &c in order {
            let s = &segments[c];
            let rows = |t: &Tensor| -> Result<Tensor> {
                Ok(if segments.len() == 1 {
                    t.clone()
                } else {
                    t.narrow(0, s.start, s.seq)?
                })
            };
            outs.push(self.attend(
                layer,
                rows(&q_all)?,
                rows(&k_all)?,
                rows(&v_all)?,
                s,
                batch[c].cache,
            )?);
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one segment")
        } else {
            Tensor::cat(&outs, 0)?
        };
        let out =
            w.o.forward_split(&out, short_rows)
                .context("attention output projection")?;
        with_bias(out, &w.bias[3])
    }

    /// One chunk's attention over its own cache: `q`, `k`, `v` are its rows
    /// of the projections (`[seq, heads*hd]`, `[seq, kv_heads*hd]`);
    /// returns `[seq, heads*hd]`.
    fn attend(
        &self,
        layer: usize,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        s: &Segment,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let seq = s.seq;
        let (hd, heads, kvh) = (self.head_dim, self.heads, self.kv_heads);
        // [seq, heads*hd] -> [1, heads, seq, hd] for rope.
        let to_heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((seq, n, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        let q = to_heads(q, heads)?;
        let k = to_heads(k, kvh)?;
        let v = to_heads(v, kvh)?.squeeze(0)?;
        let q = self.rope(&q, &s.cos, &s.sin)?.squeeze(0)?;
        let k = self.rope(&k, &s.cos, &s.sin)?.squeeze(0)?;
        self.attend_roped(layer, q, k, v, s, cache)
    }

    /// Rotary embedding of `x` `[b, heads, seq, hd]` in the checkpoint's
    /// layout, with `cos`/`sin` `[seq, hd/2]` (or `[b, seq, hd/2]`, a row
    /// per batch entry).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.rope_layout {
            RopeLayout::Halves => candle_nn::rotary_emb::rope(x, cos, sin)?,
            RopeLayout::AdjacentPairs => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
        })
    }

    /// The rest of `attend` after rope: `q` `[heads, seq, hd]`, `k` and `v`
    /// `[kv_heads, seq, hd]`; returns `[seq, heads*hd]`.
    fn attend_roped(
        &self,
        layer: usize,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        s: &Segment,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let seq = s.seq;
        let (hd, heads, kvh) = (self.head_dim, self.heads, self.kv_heads);
        let n_rep = heads / kvh;
        if s.write {
            cache.write(layer, &k, &v)?;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        // On the CPU in f32, every query row goes through the decode kernel,
        // which reads the cache in place, in its dtype, over exactly the
        // keys that row sees: a prompt row's attention is then bitwise the
        // same in a chunk of any size, and as a generated token's would be
        // (the products below sum over the chunk's whole key range, masked,
        // so their rounding depends on where the prompt was cut).
        if q.dtype() == DType::F32 && self.device.is_cpu() {
            let rows = if seq == 1 {
                q.flatten_all()?.to_vec1::<f32>()?
            } else {
                // [heads, seq, hd] -> [seq, heads, hd]
                q.transpose(0, 1)?.flatten_all()?.to_vec1::<f32>()?
            };
            let first = s.kv_end - seq;
            let mut out = vec![0f32; seq * heads * hd];
            let mut done = 0;
            for (j, (q, o)) in rows
                .chunks_exact(heads * hd)
                .zip(out.chunks_exact_mut(heads * hd))
                .enumerate()
            {
                // Row j is position first + j: it sees keys (p - W, p].
                let (start, end) = if s.write {
                    (self.first_key(first + j), first + j + 1)
                } else {
                    (s.kv_start, s.kv_end)
                };
                let row = cache.with_view(layer, start, end, |view| {
                    crate::kernels::attention::decode(q, view, heads, kvh, hd, scale as f32, o)
                });
                if row.is_none() {
                    break;
                }
                done += 1;
            }
            if done == seq {
                return Ok(Tensor::from_vec(out, (seq, heads * hd), &self.device)?);
            }
        }
        let (k_all, v_all) = cache.view(layer, s.kv_start, s.kv_end)?;
        // An f16 cache under f32 activations is widened for the products.
        let (k_all, v_all) = if k_all.dtype() == self.dtype {
            (k_all, v_all)
        } else {
            (k_all.to_dtype(self.dtype)?, v_all.to_dtype(self.dtype)?)
        };
        let kv_len = s.kv_end - s.kv_start;

        // Query heads h*n_rep..(h+1)*n_rep share kv head h: regroup the queries.
        let q = q.reshape((kvh, n_rep * seq, hd))?;
        let scores = (q.matmul(&k_all.t()?)? * scale)?.to_dtype(DType::F32)?;
        let mask = match s.mask.get() {
            Some(mask) => mask,
            None => {
                let mask = self.mask(s.kv_end - seq, seq, s.kv_start, s.kv_end)?;
                s.mask.get_or_init(|| mask)
            }
        };
        let scores = match mask {
            Some(mask) => scores
                .reshape((kvh, n_rep, seq, kv_len))?
                .broadcast_add(mask)?
                .reshape((kvh, n_rep * seq, kv_len))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v_all)?; // [kvh, n_rep*seq, hd]
        Ok(out
            .reshape((heads, seq, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((seq, heads * hd))?)
    }
}

/// One sequence's part of a batch: ids fed after what its cache holds.
pub struct Chunk<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Whether the last position's logits are wanted (a prefill chunk
    /// that does not end its prompt needs none).
    pub logits: bool,
    /// The sequence's length once the feed this chunk belongs to is done
    /// (its whole prompt, for a prompt cut into chunks; at least the
    /// chunk's end). Dynamic RoPE scaling takes its frequencies from it, as
    /// transformers takes them from the last position of a forward call.
    pub seq_len: usize,
    /// Whether `ids` are prompt positions (prefill), which take the prompt
    /// kernels (the quantized panels, bf16's `vdpbf16ps`) however many
    /// there are, rather than a generated token (decode), which takes the
    /// row kernels. The class belongs to the row, not to the chunk's size:
    /// a prompt cut into other chunks (another `--batch-tokens`, a kept
    /// prefix that covers part of it) gives bitwise the same keys, values
    /// and logits, on the CPU with f32 activations (with f16 or on CUDA,
    /// candle's products over the chunk's masked key range still depend on
    /// the cut). Only a kept prefix that holds generated tokens differs
    /// from a fresh prefill of the same text, within rounding: its rows
    /// went through the row kernels.
    pub prompt: bool,
}

/// Where a chunk's rows sit in the batch, and its positions' rope and mask.
struct Segment {
    start: usize,
    seq: usize,
    cos: Tensor,
    sin: Tensor,
    /// Whether `cos`/`sin` come from rescaled frequencies (dynamic scaling).
    rescaled: bool,
    kv_start: usize,
    kv_end: usize,
    /// The additive mask of the products' path, built on first use (the
    /// CPU's f32 path reads each row's keys itself and never needs it).
    mask: std::cell::OnceCell<Option<Tensor>>,
    /// Whether the chunk's keys and values go into its cache (not for a probe).
    write: bool,
}

/// The inverse frequencies `[head_dim/2]` of rotary embeddings, in f32 as
/// transformers computes them (`modeling_rope_utils`: the default, then
/// the scaling type's change).
pub fn inv_freq(hd: usize, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1.0 / (theta as f32).powf(i as f32 / hd as f32))
        .collect();
    match scaling {
        // Dynamic scaling changes nothing up to the original context.
        RopeScaling::None | RopeScaling::Dynamic { .. } => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                old as f32,
            );
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    // wavelen < high_freq_wavelen: no scaling; above the low one: / factor.
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    // Frequencies are finite and positive, so this is transformers'
                    // ~(wavelen < high) & ~(wavelen > low).
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// Dynamic NTK scaling (transformers' `_compute_dynamic_ntk_parameters`).
#[derive(Debug, Clone, Copy)]
struct DynamicRope {
    theta: f64,
    factor: f64,
    /// `max_position_embeddings`: up to it, the default frequencies.
    original: usize,
}

/// The inverse frequencies `[head_dim/2]` dynamic NTK scaling gives a
/// forward pass whose sequence is `seq_len` long:
/// `base = theta · (factor·L/original − (factor − 1))^(d/(d−2))` with
/// `L = max(seq_len, original)`, in f32 as transformers computes it when
/// its rotary embedding grows (`dynamic_rope_update`). Source: the
/// "dynamic NTK" of /u/bloc97 and /u/emozilla, as transformers implements it.
pub fn dynamic_inv_freq(
    hd: usize,
    theta: f64,
    factor: f64,
    original: usize,
    seq_len: usize,
) -> Vec<f32> {
    let len = seq_len.max(original) as f32;
    let (factor32, original) = (factor as f32, original as f32);
    let grown = (factor32 * len / original - (factor - 1.0) as f32)
        .powf((hd as f64 / (hd - 2) as f64) as f32);
    let base = theta as f32 * grown;
    (0..hd)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / hd as f32))
        .collect()
}

impl Model {
    /// Rope's cos/sin `[seq, head_dim/2]` for positions `pos..pos+seq` of a
    /// pass that leaves the sequence `seq_len` long, and whether they are
    /// rescaled (dynamic scaling past the original context).
    fn rope_rows(&self, pos: usize, seq: usize, seq_len: usize) -> Result<(Tensor, Tensor, bool)> {
        if let Some(d) = self.dynamic
            && seq_len > d.original
        {
            let inv_freq = dynamic_inv_freq(self.head_dim, d.theta, d.factor, d.original, seq_len);
            let (cos, sin) = rope_angles(inv_freq, pos, pos + seq, self.dtype, &self.device)?;
            return Ok((cos, sin, true));
        }
        if pos + seq > self.cos.dim(0)? {
            // The same products as the tables' rows, so the same values.
            let inv_freq = self.inv_freq.clone();
            let (cos, sin) = rope_angles(inv_freq, pos, pos + seq, self.dtype, &self.device)?;
            return Ok((cos, sin, false));
        }
        Ok((
            self.cos.narrow(0, pos, seq)?,
            self.sin.narrow(0, pos, seq)?,
            false,
        ))
    }

    /// How many of the positions `cache` holds a prompt of `prompt_len`
    /// tokens can reuse, of the `common` its ids share with the cache's:
    /// all of them, but with dynamic RoPE scaling only keys rotated with the
    /// frequencies a fresh run of this prompt would use (none, for a prompt
    /// past the original context: its frequencies depend on its length).
    pub fn reusable_prefix(&self, cache: &KvCache, prompt_len: usize, common: usize) -> usize {
        match self.dynamic {
            Some(d) if prompt_len > d.original => 0,
            Some(_) => common.min(cache.rescaled_from().unwrap_or(usize::MAX)),
            None => common,
        }
    }
}

/// Bytes of the precomputed rope tables (cos and sin, f32) at most: 128K
/// positions of a 128-wide head (64 frequencies, 512 bytes a position).
const ROPE_TABLE_BYTES: usize = 64 << 20;

/// The inverse frequencies, and cos/sin tables `[n, head_dim/2]` for the
/// first `n = min(max_len, what ROPE_TABLE_BYTES holds)` positions, computed
/// as transformers does (inverse frequencies and angles in f32), then cast
/// to the run's dtype.
fn rope_tables(
    hd: usize,
    theta: f64,
    scaling: RopeScaling,
    factors: Option<&[f32]>,
    max_len: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Vec<f32>, Tensor, Tensor)> {
    let mut inv_freq = inv_freq(hd, theta, scaling);
    // A GGUF's per-frequency divisors (llama.cpp's `freq_factors`).
    if let Some(factors) = factors {
        anyhow::ensure!(
            factors.len() == inv_freq.len(),
            "{} rope frequency factors for {} frequencies",
            factors.len(),
            inv_freq.len()
        );
        for (f, d) in inv_freq.iter_mut().zip(factors) {
            *f /= d;
        }
    }
    let row_bytes = 2 * inv_freq.len().max(1) * std::mem::size_of::<f32>();
    let n = max_len.min((ROPE_TABLE_BYTES / row_bytes).max(1));
    let (cos, sin) = rope_angles(inv_freq.clone(), 0, n, dtype, device)?;
    Ok((inv_freq, cos, sin))
}

/// cos/sin `[to - from, head_dim/2]` of positions `from..to` times
/// `inv_freq`, in f32, cast to `dtype`.
fn rope_angles(
    inv_freq: Vec<f32>,
    from: usize,
    to: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let positions = Tensor::arange(from as u32, to as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((to - from, 1))?;
    let freqs = positions.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
        v.to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// The tables stop at `ROPE_TABLE_BYTES` (a file's context times its
    /// head size once asked for 34 GB at load), and positions past them
    /// get the same values the tables would hold.
    #[test]
    fn rope_tables_are_bounded_and_positions_past_them_match() {
        let dev = Device::Cpu;
        let (_, cos, sin) = rope_tables(
            16384,
            1e4,
            RopeScaling::None,
            None,
            1 << 20,
            DType::F32,
            &dev,
        )
        .unwrap();
        let row_bytes = 2 * 8192 * 4;
        assert_eq!(cos.dims(), [ROPE_TABLE_BYTES / row_bytes, 8192]);
        assert_eq!(sin.dims(), cos.dims());
        let (inv, cos, sin) =
            rope_tables(64, 1e4, RopeScaling::None, None, 3000, DType::F32, &dev).unwrap();
        assert_eq!(cos.dim(0).unwrap(), 3000, "a small context is tabled whole");
        let (c, s) = rope_angles(inv, 2990, 2995, DType::F32, &dev).unwrap();
        assert_eq!(bits(&c), bits(&cos.narrow(0, 2990, 5).unwrap()));
        assert_eq!(bits(&s), bits(&sin.narrow(0, 2990, 5).unwrap()));
    }

    /// The batched decode path ropes `[n, heads, 1, hd]` with cos/sin
    /// `[n, 1, hd/2]`, a row per sequence: in both layouts (Llama's halves,
    /// GGUF's adjacent pairs) that must be each row roped alone.
    #[test]
    fn rope_with_a_row_per_sequence_is_each_row_roped_alone() {
        let dev = Device::Cpu;
        let (n, heads, hd) = (3, 4, 8);
        let x = Tensor::randn(0f32, 1.0, (n, heads, 1, hd), &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let angles = Tensor::randn(0f32, 1.0, (n, 1, hd / 2), &dev).unwrap();
        let cos = angles.cos().unwrap().to_dtype(DType::F16).unwrap();
        let sin = angles.sin().unwrap().to_dtype(DType::F16).unwrap();
        type Rope = fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;
        let ropes: [Rope; 2] = [candle_nn::rotary_emb::rope, candle_nn::rotary_emb::rope_i];
        for rope in ropes {
            let together = rope(&x, &cos, &sin).unwrap();
            for i in 0..n {
                let row = x.narrow(0, i, 1).unwrap();
                let alone = rope(&row, &cos.get(i).unwrap(), &sin.get(i).unwrap()).unwrap();
                assert_eq!(bits(&together.narrow(0, i, 1).unwrap()), bits(&alone));
            }
        }
    }

    #[test]
    fn silu_mul_in_place_is_bitwise_candles_silu_then_mul() {
        let dev = Device::Cpu;
        let gate = (Tensor::randn(0f32, 3.0, (5, 37), &dev).unwrap() * 1.0).unwrap();
        let up = Tensor::randn(0f32, 1.0, (5, 37), &dev).unwrap();
        let want = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        let got = silu_mul(gate.copy().unwrap(), &up).unwrap();
        assert_eq!(bits(&got), bits(&want));
        // Long enough for several tasks over the pool (the last one short),
        // with `up` starting inside its storage.
        let long = Tensor::randn(0f32, 3.0, (3, 9001), &dev).unwrap();
        let ups = Tensor::randn(0f32, 1.0, (4, 9001), &dev).unwrap();
        let up_view = ups.narrow(0, 1, 3).unwrap();
        let want = (candle_nn::ops::silu(&long).unwrap() * &up_view).unwrap();
        assert_eq!(bits(&silu_mul(long, &up_view).unwrap()), bits(&want));
        // A transposed (non-contiguous) gate and bf16 take candle's ops.
        let t = gate.t().unwrap();
        let up_t = up.t().unwrap().contiguous().unwrap();
        let want = (candle_nn::ops::silu(&t).unwrap() * &up_t).unwrap();
        assert_eq!(bits(&silu_mul(t, &up_t).unwrap()), bits(&want));
        let (g16, u16) = (
            gate.to_dtype(DType::BF16).unwrap(),
            up.to_dtype(DType::BF16).unwrap(),
        );
        let want = (candle_nn::ops::silu(&g16).unwrap() * &u16).unwrap();
        assert_eq!(bits(&silu_mul(g16, &u16).unwrap()), bits(&want));
        // Mismatched shapes are an error, not a partial product (the shape
        // check sends them to candle's `mul`, which refuses them).
        let short = Tensor::zeros((5, 36), DType::F32, &dev).unwrap();
        assert!(silu_mul(up.copy().unwrap(), &short).is_err());
    }
}
