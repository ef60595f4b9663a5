//! Model files → everything a run needs: tokenizer, chat template, the
//! ids that end an answer, generation defaults, and the model itself.
//! Built once at the edge; front ends only read it.

use crate::model::{Config, Model};
use crate::source::ModelFiles;
use crate::template::{JinjaTemplate, Template};
use crate::tokenizer::{TextTokenizer, TokenizerConfig};
use crate::weights::Weights;
use crate::weights::gguf::Gguf;
use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use serde::Deserialize;
use std::path::Path;

/// `--dtype` as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeChoice {
    Auto,
    Fixed(DType),
}

/// The optional defaults of `generation_config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<crate::model::config::TokenIds>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
}

/// Tokenizer, template and stop ids: everything but the weights. `tokenize`
/// needs only this, so it never maps the weights.
pub struct Text {
    pub tokenizer: TextTokenizer,
    pub template: Template,
    pub stop_ids: Vec<u32>,
    pub generation: GenerationConfig,
    pub config: Config,
}

pub struct Loaded {
    pub text: Text,
    pub model: Model,
    pub load_s: f64,
    /// The weights' move into memory, when one runs (`Weights::finish`).
    pub resident: Option<crate::weights::resident::Mover>,
}

pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).context("opening CUDA device 0"),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n).with_context(|| format!("opening CUDA device {n}")),
            _ => bail!("unknown device {other:?} (cpu, cuda or cuda:N)"),
        },
    }
}

pub fn load_text(files: &ModelFiles, template: &str) -> Result<Text> {
    if let Some(path) = &files.gguf {
        return text_from_gguf(&Gguf::open(path)?, template);
    }
    let config_path = files
        .config
        .as_ref()
        .with_context(|| format!("{} has no config.json", files.dir.display()))?;
    let config = Config::from_file(config_path)?;
    let tok_config = match &files.tokenizer.tokenizer_config {
        Some(p) => Some(TokenizerConfig::from_file(p)?),
        None => None,
    };
    let tokenizer = TextTokenizer::load(&files.tokenizer, tok_config.as_ref())?;
    let generation = match &files.generation_config {
        Some(p) => read_json::<GenerationConfig>(p)?,
        None => GenerationConfig::default(),
    };
    let jinja = match tok_config.as_ref().and_then(|c| c.chat_template.as_ref()) {
        Some(t) if template == "auto" => Some(t.default_template()?),
        _ => None,
    };
    let content = |t: Option<&crate::tokenizer::TokenField>| t.map(|t| t.content().to_string());
    let template = choose_template(
        template,
        &tokenizer,
        jinja,
        content(tok_config.as_ref().and_then(|c| c.bos_token.as_ref())),
        content(tok_config.as_ref().and_then(|c| c.eos_token.as_ref())),
    )?;
    let eos = [
        generation.eos_token_id.as_ref(),
        config.eos_token_id.as_ref(),
    ];
    let stop_ids = stop_ids(&template, &tokenizer, eos.into_iter().flatten());
    // The other special-token strings transformers passes to templates.
    let template = match (template, &tok_config) {
        (Template::Jinja(mut j), Some(c)) => {
            for (name, token) in [("unk_token", &c.unk_token), ("pad_token", &c.pad_token)] {
                if let Some(t) = token {
                    j = j.with_variable(name, t.content());
                }
            }
            Template::Jinja(j)
        }
        (template, _) => template,
    };
    Ok(Text {
        tokenizer,
        template,
        stop_ids,
        generation,
        config,
    })
}

/// Everything but the weights from a GGUF file's metadata: the config, the
/// SentencePiece vocabulary (converted as `tokenizer.model` is), and the
/// chat template when the file has one.
pub fn text_from_gguf(gguf: &Gguf, template: &str) -> Result<Text> {
    let config = gguf.config().clone();
    let vocab = gguf.tokenizer_vocab()?;
    // As llama.cpp requires: one token per row of the embedding, and the
    // BOS/EOS ids among them (else answers would hold ids with no text).
    let path = gguf.path().display();
    if vocab.len() != config.vocab_size {
        bail!(
            "{path}: the vocabulary has {} tokens but the model {}",
            vocab.len(),
            config.vocab_size
        );
    }
    let eos_ids = config
        .eos_token_id
        .as_ref()
        .map(|e| e.to_vec())
        .unwrap_or_default();
    for id in config.bos_token_id.iter().chain(&eos_ids) {
        if *id as usize >= vocab.len() {
            bail!(
                "{path}: BOS/EOS id {id} is not in the vocabulary of {} tokens",
                vocab.len()
            );
        }
    }
    let tokenizer = TextTokenizer::from_gguf_vocab(&vocab)
        .with_context(|| format!("building the tokenizer of {path}"))?;
    let name = |id: Option<u32>| id.and_then(|id| tokenizer.inner().id_to_token(id));
    let (bos, eos) = (
        name(config.bos_token_id),
        name(
            config
                .eos_token_id
                .as_ref()
                .and_then(|e| e.to_vec().first().copied()),
        ),
    );
    let jinja = gguf.chat_template();
    let template = choose_template(template, &tokenizer, jinja.as_deref(), bos, eos)?;
    let mut stop_ids = stop_ids(&template, &tokenizer, config.eos_token_id.iter());
    // A GGUF carries one EOS id; the others that end an answer (Llama 3's
    // <|eot_id|>, Qwen's <|endoftext|> beside <|im_end|>) are its end-of-turn
    // keys and, as llama.cpp finds them, tokens with these texts.
    for id in gguf.end_of_turn_ids()? {
        if id as usize >= vocab.len() {
            bail!(
                "{path}: end-of-turn id {id} is not in the vocabulary of {} tokens",
                vocab.len()
            );
        }
        stop_ids.push(id);
    }
    // Only tokens of the vocabulary's own special ones: Qwen's byte-level
    // "</s>" is ordinary text (HTML), not an end.
    let specials = tokenizer.template_tokens();
    stop_ids.extend(
        specials
            .iter()
            .filter(|(text, _)| END_OF_GENERATION.contains(&text.as_str()))
            .map(|&(_, id)| id),
    );
    stop_ids.sort_unstable();
    stop_ids.dedup();
    Ok(Text {
        tokenizer,
        template,
        stop_ids,
        generation: GenerationConfig::default(),
        config,
    })
}

/// Special tokens that end an answer in a GGUF model whatever its metadata
/// says: from llama.cpp's list (`llama_vocab::impl::load`,
/// `special_eog_ids`), which also takes them when they are ordinary text.
const END_OF_GENERATION: [&str; 12] = [
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end_of_turn|>",
    "<EOT>",
    "</s>",
    "<eos>",
    "<end_of_utterance>",
];

/// The ids that end an answer: the template's end-of-turn tokens and the
/// model's EOS ids, or `</s>` when neither names any.
fn stop_ids<'a>(
    template: &Template,
    tokenizer: &TextTokenizer,
    eos: impl Iterator<Item = &'a crate::model::config::TokenIds>,
) -> Vec<u32> {
    let mut ids: Vec<u32> = template
        .stop_tokens()
        .iter()
        .filter_map(|t| tokenizer.token_id(t))
        .collect();
    for list in eos {
        ids.extend(list.to_vec());
    }
    if ids.is_empty()
        && let Some(id) = tokenizer.token_id("</s>")
    {
        ids.push(id);
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `auto` is the model's own chat_template when it has one; otherwise
/// OpenChat when the vocabulary has `<|end_of_turn|>`, else Vicuna v1.1
/// (declare-lab/starling-7B ships no template).
fn choose_template(
    name: &str,
    tokenizer: &TextTokenizer,
    jinja: Option<&str>,
    bos: Option<String>,
    eos: Option<String>,
) -> Result<Template> {
    if name != "auto" {
        return Template::builtin(name);
    }
    if let Some(source) = jinja {
        let specials = tokenizer
            .template_tokens()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        return Ok(Template::Jinja(JinjaTemplate::new(
            source, bos, eos, specials,
        )?));
    }
    if tokenizer.token_id("<|end_of_turn|>").is_some() {
        Ok(Template::OpenChat)
    } else {
        Ok(Template::Vicuna)
    }
}

/// The compute dtype. Without `--dtype`: the checkpoint's own dtype on
/// CUDA; on CPU, f16 checkpoints stay f16 and everything else runs in f32
/// (candle's CPU matmul has no bf16 kernel), unless f32 weights would not
/// fit in the memory available and f16 would: then f16, said in one line.
/// Weights that fit in no allowed dtype are refused before any allocation:
/// a clear error beats the OOM killer.
pub fn choose_dtype(
    choice: DTypeChoice,
    stored: Option<DType>,
    config: &Config,
    device: &Device,
) -> Result<DType> {
    choose_dtype_for(
        choice,
        stored,
        weight_bytes(config, DType::F32) as u64,
        device,
    )
}

/// `choose_dtype` for weights of `f32_bytes` in f32 (a reward model's,
/// whose head is one row, not a vocabulary).
pub fn choose_dtype_for(
    choice: DTypeChoice,
    stored: Option<DType>,
    f32_bytes: u64,
    device: &Device,
) -> Result<DType> {
    let available = if device.is_cpu() {
        available_memory()
    } else {
        None
    };
    let (dtype, fell_back) = decide_dtype(choice, stored, device.is_cpu(), f32_bytes, available)?;
    if fell_back {
        eprintln!(
            "note: the weights need {:.1} GB in f32, more than the memory available; running in f16 ({:.1} GB)",
            f32_bytes as f64 / 1e9,
            f32_bytes as f64 / 2e9
        );
    }
    Ok(dtype)
}

/// The decision behind `choose_dtype`, free of the machine: returns the
/// dtype and whether it fell back to f16 for lack of memory.
fn decide_dtype(
    choice: DTypeChoice,
    stored: Option<DType>,
    cpu: bool,
    f32_bytes: u64,
    available: Option<u64>,
) -> Result<(DType, bool)> {
    let dtype = match choice {
        DTypeChoice::Fixed(d) => d,
        DTypeChoice::Auto => match (cpu, stored) {
            (false, Some(d @ (DType::F32 | DType::F16 | DType::BF16))) => d,
            // bf16 weights widened in registers give exactly what f32 would,
            // from half the memory (see kernels/bf16.rs).
            (true, Some(d @ (DType::F16 | DType::BF16))) => d,
            _ => DType::F32,
        },
    };
    let bytes = |d: DType| f32_bytes / 4 * d.size_in_bytes() as u64;
    if let (true, Some(available)) = (cpu, available)
        && bytes(dtype) > available
    {
        // Without --dtype, 16 bits is the smallest option on the CPU: use it, or report it.
        let smallest = match choice {
            DTypeChoice::Auto if dtype == DType::F32 => DType::F16,
            _ => dtype,
        };
        if smallest != dtype && bytes(smallest) <= available {
            return Ok((smallest, true));
        }
        let f16_fits = bytes(DType::F16) <= available;
        let hint = if smallest == DType::F32 && f16_fits {
            "; try --dtype f16"
        } else {
            ""
        };
        bail!(
            "the weights need {:.2} GB in {smallest:?}, more than the {:.2} GB of memory available{hint}",
            bytes(smallest) as f64 / 1e9,
            available as f64 / 1e9
        );
    }
    Ok((dtype, false))
}

/// The compute dtype for `weights`: quantized matrices take f32
/// activations (candle's quantized kernels are written for them), so a
/// quantized model runs in f32 whatever the checkpoint's dtype; anything
/// else is `choose_dtype`'s decision.
pub fn model_dtype(
    choice: DTypeChoice,
    weights: &Weights,
    config: &Config,
    device: &Device,
) -> Result<DType> {
    if weights.is_quantized() {
        if let DTypeChoice::Fixed(d) = choice
            && d != DType::F32
        {
            eprintln!("note: quantized weights compute in f32; --dtype {d:?} is ignored");
        }
        return Ok(DType::F32);
    }
    choose_dtype(choice, weights.stored_dtype(), config, device)
}

/// What the weights of `config` will take in memory once loaded with these
/// choices, in bytes, worked out before loading (for planning two models
/// at once): the quantized size under `quantize`, a GGUF file's own size,
/// else every tensor in the dtype `model_dtype` would choose (the memory
/// fallback aside). `value_head`: the output is `v_head` `[1, hidden]`, not
/// `lm_head`.
pub fn planned_bytes(
    config: &Config,
    weights: &Weights,
    choice: DTypeChoice,
    quantize: Option<GgmlDType>,
    device: &Device,
    value_head: bool,
) -> Result<u64> {
    let mut shapes = crate::model::synthetic::tensor_shapes(config);
    if value_head {
        shapes.remove("lm_head.weight");
        shapes.insert("v_head.weight".into(), vec![1, config.hidden_size]);
    }
    let params: u64 = shapes
        .values()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum();
    if let Some(q) = quantize.filter(|&q| crate::model::linear::is_block_format(q)) {
        return Ok(params * q.type_size() as u64 / q.block_size() as u64);
    }
    if let Some(g) = weights.gguf() {
        return Ok(std::fs::metadata(g.path())
            .with_context(|| format!("reading {}", g.path().display()))?
            .len());
    }
    let (dtype, _) = decide_dtype(
        choice,
        weights.stored_dtype(),
        device.is_cpu(),
        params * 4,
        None,
    )?;
    Ok(params * dtype.size_in_bytes() as u64)
}

/// Memory available for new allocations (Linux MemAvailable), if known.
pub fn memory_available() -> Option<u64> {
    available_memory()
}

/// Memory available for new allocations on `device`, if known: the host's
/// (`memory_available`) for the CPU, the GPU's free memory (the driver's
/// `cuMemGetInfo`) for CUDA. A KV cache or a second model planned against
/// the host's memory would grow into the GPU's out-of-memory error.
pub fn memory_available_on(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => memory_available(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free as u64),
        _ => None,
    }
}

/// What `memory_available_on(device)` measures, in words.
pub fn memory_kind(device: &Device) -> &'static str {
    memory_kind_of(!device.is_cpu())
}

/// `memory_kind` of a GPU (`gpu`) or of the host.
pub fn memory_kind_of(gpu: bool) -> &'static str {
    if gpu { "GPU memory" } else { "memory" }
}

/// Bytes of every weight of `config` in `dtype`.
pub fn weight_bytes(config: &Config, dtype: DType) -> usize {
    crate::model::synthetic::tensor_shapes(config)
        .values()
        .map(|s| s.iter().product::<usize>() * dtype.size_in_bytes())
        .sum()
}

/// MemAvailable from /proc/meminfo (Linux), if the OS says.
/// Within a cgroup (v2) memory limit, the least room left under it and its
/// ancestors' limits: a container's limit, not the machine's, is what an
/// allocation runs into.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let machine = kb * 1024;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok();
    let group = own
        .as_deref()
        .and_then(|text| text.lines().find_map(|l| l.strip_prefix("0::")));
    Some(match group {
        Some(path) => machine.min(cgroup_room(Path::new("/sys/fs/cgroup"), path)),
        None => machine,
    })
}

/// `memory.max - memory.current` of cgroup `path` under `root` and of each
/// of its ancestors, the least of them (`u64::MAX` where none sets a limit
/// or the files cannot be read).
fn cgroup_room(root: &Path, path: &str) -> u64 {
    let read = |dir: &Path, name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let mut room = u64::MAX;
    let mut dir = root.join(path.trim_start_matches('/'));
    while dir.starts_with(root) {
        if let (Some(max), Some(current)) = (read(&dir, "memory.max"), read(&dir, "memory.current"))
        {
            room = room.min(max.saturating_sub(current));
        }
        if !dir.pop() {
            break;
        }
    }
    room
}

pub fn load(
    files: &ModelFiles,
    template: &str,
    dtype: DTypeChoice,
    quantize: Option<GgmlDType>,
    device: &Device,
    keep_mapped: bool,
) -> Result<Loaded> {
    let start = std::time::Instant::now();
    if files.weights.is_empty() {
        bail!(
            "{} has no weights (model.safetensors, pytorch_model.bin, a shard index or a .gguf)",
            files.dir.display()
        );
    }
    let weights = Weights::open(&files.weights)?.quantize_to(quantize);
    weights.ensure_not_reward_model(files.origin())?;
    let text = match weights.gguf() {
        Some(gguf) => text_from_gguf(gguf, template)?,
        None => load_text(files, template)?,
    };
    let dtype = model_dtype(dtype, &weights, &text.config, device)?;
    let model = Model::load(&text.config, &weights, dtype, device)
        .with_context(|| format!("loading the model from {}", files.origin().display()))?;
    let vocab = text.tokenizer.vocab_size();
    if vocab > text.config.vocab_size {
        bail!(
            "the tokenizer has {vocab} tokens but the model only {} (config.json vocab_size)",
            text.config.vocab_size
        );
    }
    let load_s = start.elapsed().as_secs_f64();
    let resident = weights.finish(device, keep_mapped);
    Ok(Loaded {
        text,
        model,
        load_s,
        resident,
    })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;
    const AUTO: DTypeChoice = DTypeChoice::Auto;

    #[test]
    fn cpu_defaults_to_f32_and_falls_back_to_f16_when_f32_does_not_fit() {
        let bf16 = Some(DType::BF16);
        let f32 = Some(DType::F32);
        assert_eq!(
            decide_dtype(AUTO, f32, true, 29 * GB, Some(40 * GB)).unwrap(),
            (DType::F32, false)
        );
        assert_eq!(
            decide_dtype(AUTO, f32, true, 29 * GB, Some(20 * GB)).unwrap(),
            (DType::F16, true)
        );
        // bf16 checkpoints keep their weights in bf16 (computing in f32).
        assert_eq!(
            decide_dtype(AUTO, bf16, true, 29 * GB, Some(20 * GB)).unwrap(),
            (DType::BF16, false)
        );
        assert_eq!(
            decide_dtype(AUTO, Some(DType::F16), true, 29 * GB, Some(20 * GB)).unwrap(),
            (DType::F16, false)
        );
        let err = decide_dtype(AUTO, f32, true, 29 * GB, Some(10 * GB))
            .unwrap_err()
            .to_string();
        assert!(err.contains("the weights need 14.50 GB in F16"), "{err}");
    }

    #[test]
    fn an_explicit_dtype_is_never_changed() {
        let f32 = DTypeChoice::Fixed(DType::F32);
        let err = decide_dtype(f32, None, true, 29 * GB, Some(20 * GB))
            .unwrap_err()
            .to_string();
        assert!(err.contains("try --dtype f16"), "{err}");
        assert_eq!(
            decide_dtype(
                DTypeChoice::Fixed(DType::BF16),
                None,
                true,
                GB,
                Some(20 * GB)
            )
            .unwrap(),
            (DType::BF16, false)
        );
    }

    #[test]
    fn the_room_under_a_cgroup_limit_is_the_least_over_its_ancestors() {
        let root = tempfile::tempdir().unwrap();
        let write = |dir: &str, max: &str, current: &str| {
            let d = root.path().join(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("memory.max"), max).unwrap();
            std::fs::write(d.join("memory.current"), current).unwrap();
        };
        write("", "max\n", "123\n");
        write("a", "8000\n", "1000\n");
        write("a/b", "max\n", "500\n");
        assert_eq!(cgroup_room(root.path(), "/a/b"), 7000);
        write("a/b", "3000\n", "500\n");
        assert_eq!(cgroup_room(root.path(), "/a/b"), 2500);
        // Over the limit (page cache charged): no room, not an underflow.
        write("a/b", "3000\n", "4000\n");
        assert_eq!(cgroup_room(root.path(), "/a/b"), 0);
        // No limit anywhere, or no such group.
        assert_eq!(cgroup_room(root.path(), "/"), u64::MAX);
        assert_eq!(cgroup_room(root.path(), "/nowhere"), u64::MAX);
    }

    #[test]
    fn cuda_keeps_the_checkpoint_dtype() {
        assert_eq!(
            decide_dtype(AUTO, Some(DType::BF16), false, 29 * GB, None).unwrap(),
            (DType::BF16, false)
        );
    }
}
