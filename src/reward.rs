//! Reward models: a Llama decoder whose `lm_head` is replaced by a value
//! head (`v_head`, hidden -> 1, no bias), as released with Starling
//! (berkeley-nest/Starling-RM-7B-alpha, Nexusflow/Starling-RM-34B; Zhu et
//! al., "Starling-7B: Improving LLM Helpfulness & Harmlessness with RLAIF",
//! 2023). The reward of a conversation is the value head applied to a
//! final-norm hidden state; which position's is the [`Readout`].

use crate::engine::{Engine, EngineConfig, Handle, Probe};
use crate::loader::{self, DTypeChoice};
use crate::model::{Config, Head, Layout, Logits, Model};
use crate::source::ModelFiles;
use crate::template::Message;
use crate::template::reward::{REWARD_MAX_TOKENS, RewardTemplate};
use crate::tokenizer::{TextTokenizer, TokenizerConfig, TokenizerFiles};
use crate::weights::Weights;
use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use std::sync::Arc;

/// Where the trunk of a reward checkpoint may sit, in order of preference.
/// The model cards load with `strict=False` from classes that keep the trunk
/// as `transformer` and alias it (`model.model`), so a file may hold it
/// under two names; `model.` is the plain transformers layout.
pub const TRUNK_PREFIXES: [&str; 3] = ["transformer", "model.model", "model"];

/// Which position's hidden state the value head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readout {
    /// The last real token: what Starling-RM-34B's card and the authors'
    /// scoring script compute. The default.
    Last,
    /// What Starling-RM-7B-alpha's card code computes as written: its pad id
    /// resolves to BOS, which every input starts with, so it reads the last
    /// row of the input right-padded with `<unk>` to 2048 tokens: a pad
    /// token at position 2047 whose attention mask hides itself and the
    /// other pads. Computed as one extra query over the real tokens' cache
    /// ([`Model::probe`]). When the input fills all 2048 positions, or for
    /// the ChatML reward models (whose card reads the last real token), it
    /// is `Last`.
    Card,
}

impl Readout {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "last" => Ok(Self::Last),
            "card" => Ok(Self::Card),
            other => bail!(
                "unknown readout {:?} (last or card)",
                other.chars().take(32).collect::<String>()
            ),
        }
    }
}

pub struct RewardModel {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub template: RewardTemplate,
    pub readout: Readout,
    /// The prefix the trunk was found under.
    pub trunk: String,
    pub load_s: f64,
}

/// How to load a reward model: the choices `starling score` and
/// `run --best-of` take from their flags.
#[derive(Debug, Clone)]
pub struct RewardOptions {
    pub template: RewardTemplate,
    pub readout: Readout,
    pub dtype: DTypeChoice,
    pub quantize: Option<GgmlDType>,
}

impl RewardModel {
    /// Loads the reward model in `files`, with the tokenizer of `tokenizer`
    /// (another repo's, when the reward model ships none).
    pub fn load(
        files: &ModelFiles,
        tokenizer: &TokenizerFiles,
        options: &RewardOptions,
        device: &Device,
    ) -> Result<Self> {
        let start = std::time::Instant::now();
        let (config, weights) = open(files, options.quantize)?;
        let trunk = trunk_prefix(&weights)?;
        let tokenizer = load_tokenizer(tokenizer)?;
        if tokenizer.vocab_size() > config.vocab_size {
            bail!(
                "the tokenizer has {} tokens but the reward model only {} (config.json vocab_size)",
                tokenizer.vocab_size(),
                config.vocab_size
            );
        }
        let dtype = if weights.is_quantized() {
            DType::F32 // quantized matrices take f32 activations
        } else {
            let f32_bytes = loader::planned_bytes(
                &config,
                &weights,
                DTypeChoice::Fixed(DType::F32),
                None,
                device,
                true,
            )?;
            loader::choose_dtype_for(options.dtype, weights.stored_dtype(), f32_bytes, device)?
        };
        let layout = Layout {
            trunk: trunk.clone(),
            head: Head::Value,
        };
        let model =
            Model::load_layout(&config, &weights, dtype, device, &layout).with_context(|| {
                format!("loading the reward model from {}", files.origin().display())
            })?;
        Ok(Self {
            model,
            tokenizer,
            template: options.template,
            readout: options.readout,
            trunk,
            load_s: start.elapsed().as_secs_f64(),
        })
    }

    /// The ids the model reads for `messages` (ending with the answer judged).
    pub fn encode(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.template
            .encode(&self.tokenizer, messages, max_tokens(self.model.max_len()))
    }

    /// The reward of `messages`: a conversation ending with the assistant's
    /// answer being judged. Higher is better; the scale is the model's own.
    pub fn score(&self, messages: &[Message]) -> Result<f32> {
        self.score_ids(&self.encode(messages)?)
    }

    /// The reward of already-encoded ids (see [`RewardTemplate::encode`]),
    /// computed here, one conversation per pass: [`RewardEngine`] shares
    /// the passes between many.
    pub fn score_ids(&self, ids: &[u32]) -> Result<f32> {
        if ids.is_empty() {
            bail!("nothing to score: the conversation encodes to no tokens");
        }
        let probe = self.readout_probe(ids.len())?;
        let mut cache = self.model.new_cache_of(ids.len());
        let last = self.model.forward(ids, &mut cache, Logits::Last)?;
        let value = match probe {
            Some(p) => self.model.probe(p.id, p.position, &mut cache)?,
            None => last,
        };
        let v = value.to_dtype(DType::F32)?.to_vec1::<f32>()?[0];
        if !v.is_finite() {
            bail!(
                "the reward is {v}, not a finite number (the model's weights, or its activations in this dtype, overflow)"
            );
        }
        Ok(v)
    }

    /// Where the reward is read for `len` ids other than at the last one:
    /// the card's pad position, if `--readout card` applies.
    fn readout_probe(&self, len: usize) -> Result<Option<Probe>> {
        readout_probe(
            self.readout,
            self.template,
            &self.tokenizer,
            self.model.max_len(),
            len,
        )
    }

    /// Starts an engine over this model, so that many conversations share
    /// each pass over the weights (continuous batching, as for answers).
    pub fn into_engine(self, config: EngineConfig) -> Result<RewardEngine> {
        // A read-out the model cannot give (no `<unk>`, a context under
        // 2048) fails here, before any input is queued.
        readout_probe(
            self.readout,
            self.template,
            &self.tokenizer,
            self.model.max_len(),
            1,
        )?;
        let max_len = self.model.max_len();
        let tokenizer = Arc::new(self.tokenizer);
        let engine = Engine::start(self.model, Some(tokenizer.clone()), config)?;
        Ok(RewardEngine {
            engine,
            tokenizer,
            template: self.template,
            readout: self.readout,
            max_len,
        })
    }
}

/// A reward model inside the engine: conversations are queued as score
/// requests and read in the same passes over the weights.
pub struct RewardEngine {
    pub engine: Engine,
    pub tokenizer: Arc<TextTokenizer>,
    pub template: RewardTemplate,
    pub readout: Readout,
    max_len: usize,
}

impl RewardEngine {
    /// Queues the reward of `messages` (ending with the answer judged).
    pub fn submit(&self, messages: &[Message]) -> Result<Handle> {
        let ids = self
            .template
            .encode(&self.tokenizer, messages, max_tokens(self.max_len))?;
        let probe = readout_probe(
            self.readout,
            self.template,
            &self.tokenizer,
            self.max_len,
            ids.len(),
        )?;
        self.engine.submit_score(ids, probe)
    }

    /// The rewards of `conversations`, in order, all queued at once.
    pub fn score_all(&self, conversations: &[Vec<Message>]) -> Result<Vec<f32>> {
        self.score_each(conversations).into_iter().collect()
    }

    /// Each conversation's reward or error, in order, all queued at once:
    /// one that fails (a reward that is not finite) leaves the others.
    pub fn score_each(&self, conversations: &[Vec<Message>]) -> Vec<Result<f32>> {
        let handles: Vec<Result<Handle>> = conversations.iter().map(|c| self.submit(c)).collect();
        handles
            .into_iter()
            .map(|h| h.and_then(wait_reward))
            .collect()
    }
}

/// The most tokens a reward model reads: the cards' 2048, or the model's
/// own context when that is shorter.
pub fn max_tokens(max_len: usize) -> usize {
    REWARD_MAX_TOKENS.min(max_len)
}

/// The reward a score request's handle ends with.
pub fn wait_reward(handle: Handle) -> Result<f32> {
    let outcome = handle.wait(&mut |_| Ok(()), None)?;
    outcome
        .reward
        .context("the engine finished a score request without a reward")
}

/// Where the reward of `len` ids is read other than at the last one: the
/// 7B card's pad position (2047, a `<unk>`), when `--readout card` applies
/// (the Llama-2 template, inputs shorter than 2048).
fn readout_probe(
    readout: Readout,
    template: RewardTemplate,
    tokenizer: &TextTokenizer,
    max_len: usize,
    len: usize,
) -> Result<Option<Probe>> {
    if readout != Readout::Card || template != RewardTemplate::Llama2 || len >= REWARD_MAX_TOKENS {
        return Ok(None);
    }
    let position = REWARD_MAX_TOKENS - 1;
    if position >= max_len {
        bail!("--readout card reads position {position}, beyond the model's context of {max_len}");
    }
    // The card's pad token: `tokenizer.pad_token = tokenizer.unk_token`.
    let id = tokenizer
        .token_id("<unk>")
        .context("--readout card pads with <unk>, which this vocabulary does not have")?;
    Ok(Some(Probe { id, position }))
}

/// The config and the weights of a reward checkpoint, checked to be one:
/// a `v_head.weight` of shape `[1, hidden]`.
pub fn open(files: &ModelFiles, quantize: Option<GgmlDType>) -> Result<(Config, Weights)> {
    if files.gguf.is_some() {
        bail!(
            "reward models are read from transformers checkpoints (safetensors or .bin), not GGUF"
        );
    }
    let config_path = files
        .config
        .as_ref()
        .with_context(|| format!("{} has no config.json", files.dir.display()))?;
    let config = Config::from_file(config_path)?;
    if files.weights.is_empty() {
        bail!(
            "{} has no weights (model.safetensors, pytorch_model.bin or a shard index)",
            files.dir.display()
        );
    }
    let weights = Weights::open(&files.weights)?.quantize_to(quantize);
    match weights.shape("v_head.weight") {
        None => bail!(
            "not a reward model: no v_head.weight in {} (it holds {})",
            files.dir.display(),
            summary(&weights.names())
        ),
        Some(shape) if shape != [1, config.hidden_size] => bail!(
            "v_head.weight has shape {shape:?}, expected [1, {}] (a value head over hidden_size)",
            config.hidden_size
        ),
        Some(_) => {}
    }
    if weights.contains("v_head.bias") {
        bail!(
            "the value head has a bias (v_head.bias): the Starling reward models' heads have none, and starling reads only v_head.weight"
        );
    }
    Ok((config, weights))
}

/// The prefix the decoder trunk is stored under: the first of
/// [`TRUNK_PREFIXES`] present. When several are, they must hold the same
/// tensors (same names and shapes, and equal values in a sample), else the
/// file is ambiguous and refused.
pub fn trunk_prefix(weights: &Weights) -> Result<String> {
    let present: Vec<&str> = TRUNK_PREFIXES
        .iter()
        .copied()
        .filter(|p| weights.contains(&format!("{p}.embed_tokens.weight")))
        .collect();
    let Some(&chosen) = present.first() else {
        bail!(
            "no decoder trunk: none of {} is present (the file holds {})",
            TRUNK_PREFIXES
                .iter()
                .map(|p| format!("{p}.embed_tokens.weight"))
                .collect::<Vec<_>>()
                .join(", "),
            summary(&weights.names())
        );
    };
    let names = weights.names();
    let under = |prefix: &str| -> Vec<String> {
        let prefix = format!("{prefix}.");
        names
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix))
            // `model.` also matches `model.model.*` and `model.lm_head`.
            .filter(|rest| {
                rest.starts_with("embed_tokens.")
                    || rest.starts_with("layers.")
                    || rest.starts_with("norm.")
            })
            .map(str::to_string)
            .collect()
    };
    let mine = under(chosen);
    for &other in &present[1..] {
        let theirs = under(other);
        let same_shapes = mine == theirs
            && mine.iter().all(|n| {
                weights.shape(&format!("{chosen}.{n}")) == weights.shape(&format!("{other}.{n}"))
            });
        if !same_shapes {
            bail!(
                "the trunk is stored twice, as {chosen}.* and {other}.*, with different tensors or shapes: which one is the reward model's is ambiguous"
            );
        }
        for n in ["norm.weight", "layers.0.self_attn.q_proj.weight"] {
            let (a, b) = (format!("{chosen}.{n}"), format!("{other}.{n}"));
            let Some(shape) = weights.shape(&a) else {
                continue;
            };
            let load = |name: &str| {
                weights
                    .tensor(name, &shape, DType::F32, &Device::Cpu)
                    .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            };
            if load(&a)? != load(&b)? {
                bail!(
                    "the trunk is stored twice, as {chosen}.* and {other}.*, with different values ({n}): which one is the reward model's is ambiguous"
                );
            }
        }
    }
    Ok(chosen.to_string())
}

/// The reward model's tokenizer: tokenizer.json or tokenizer.model, plus
/// what tokenizer_config.json declares.
pub fn load_tokenizer(files: &TokenizerFiles) -> Result<TextTokenizer> {
    let config = match &files.tokenizer_config {
        Some(p) => Some(TokenizerConfig::from_file(p)?),
        None => None,
    };
    TextTokenizer::load(files, config.as_ref())
}

/// A few tensor names, for an error message about what a file holds.
fn summary(names: &[String]) -> String {
    const SHOWN: usize = 4;
    if names.is_empty() {
        return "no tensors".to_string();
    }
    let shown: Vec<String> = names
        .iter()
        .take(SHOWN)
        .map(|n| crate::weights::shown(n))
        .collect();
    let more = names.len().saturating_sub(SHOWN);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}
