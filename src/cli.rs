//! Every command-line definition, in one place. Option groups shared by
//! several commands (model, device, sampling) are flattened into each.

use crate::engine::SamplerConfig;
use crate::loader::{DTypeChoice, GenerationConfig};
use anyhow::Result;
use candle_core::DType;
use candle_core::quantized::GgmlDType;
use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// The most compute threads starling starts (`--threads`, RAYON_NUM_THREADS):
/// far above any core count, low enough that a typo cannot ask the system
/// for tens of thousands of threads.
pub const MAX_THREADS: u16 = 1024;

#[derive(Debug, Parser)]
#[command(
    name = "starling",
    version,
    about = "Run Starling and other Mistral/Llama-style chat models locally"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Answer one prompt (argument, stdin, or both), streaming the answer.
    Run(RunArgs),
    /// Chat interactively (or one turn per stdin line when stdin is not a terminal).
    Chat(ChatArgs),
    /// Print the token ids of text, or of a conversation as the model sees it.
    Tokenize(TokenizeArgs),
    /// Download a model into the cache without running it.
    Pull(PullArgs),
    /// Show the known model names and every cached model with its size.
    List,
    /// Remove a cached model.
    Rm(RmArgs),
    /// Measure prompt-processing and generation speed (like llama-bench).
    Bench(BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Write a model as a GGUF file of quantized weights (llama.cpp loads it too).
    Quantize(QuantizeArgs),
    /// Score conversations with a reward model (Starling-RM-7B-alpha, Starling-RM-34B).
    Score(ScoreArgs),
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub reward: RewardArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// A conversation as JSON ([{"role", "content"}] or {"messages": [...]}) ending
    /// with the assistant's answer to judge. Without it (and without --each-line),
    /// stdin holds one such document, or {"prompt", "responses": [...]} to rank.
    #[arg(long, value_name = "FILE", conflicts_with = "each_line")]
    pub messages: Option<PathBuf>,
    /// Score each line of stdin: {"messages": [...]} or {"prompt", "responses": [...]};
    /// prints one JSON line per input line, in order.
    #[arg(long)]
    pub each_line: bool,
    /// Print {"score": ...} instead of the bare number.
    #[arg(long)]
    pub json: bool,
    /// Conversations scored together in each pass over the weights (default:
    /// 8, fewer when their KV caches would not fit in half the memory).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=256).map(usize::from))]
    pub parallel: Option<usize>,
    /// Print the load time and the scoring time on stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// Which reward model, and how it reads a conversation.
#[derive(Debug, Args)]
pub struct RewardArgs {
    /// The reward model: starling-rm-7b, starling-rm-34b, a directory or a hub repo.
    #[arg(long, short = 'm', default_value = "starling-rm-7b")]
    pub model: String,
    /// Where the tokenizer is when the reward model ships none: a directory or a
    /// hub repo (default: the one its card names, e.g. meta-llama/Llama-2-7b-chat-hf,
    /// gated: set HF_TOKEN).
    #[arg(long, value_name = "DIR|REPO")]
    pub tokenizer: Option<String>,
    /// auto (the known models' own), llama2-rm or chatml-rm.
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// last: the reward at the last token (default; what the 34B card and the
    /// authors' scoring script read). card: what the 7B card's code reads, a
    /// <unk> pad at position 2047.
    #[arg(long, default_value = "last", value_parser = ["last", "card"])]
    pub readout: String,
    /// Use only the local cache, never the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// Set for `run --best-of`, whose flags are --reward-template and
    /// --reward-tokenizer (for the messages).
    #[arg(skip)]
    pub for_best_of: bool,
}

/// `run --best-of N`: sample N answers and keep the one a reward model prefers.
#[derive(Debug, Args)]
pub struct BestOfArgs {
    /// Sample N answers (choice i with seed + i) and print the one the reward
    /// model scores highest (needs --reward-model and a temperature above 0).
    #[arg(long, value_name = "N", requires = "reward_model",
          value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    pub best_of: Option<usize>,
    /// The reward model for --best-of (starling-rm-7b, a directory or a hub repo).
    #[arg(long, value_name = "MODEL", requires = "best_of")]
    pub reward_model: Option<String>,
    /// The reward model's tokenizer when it ships none (directory or hub repo).
    #[arg(long, value_name = "DIR|REPO", requires = "best_of")]
    pub reward_tokenizer: Option<String>,
    /// The reward model's template: auto, llama2-rm or chatml-rm.
    #[arg(long, default_value = "auto", requires = "best_of")]
    pub reward_template: String,
    /// The reward model's weights dtype (as --dtype).
    #[arg(long, value_enum, requires = "best_of")]
    pub reward_dtype: Option<DTypeArg>,
    /// Quantize the reward model while loading (as --quantize).
    #[arg(long, value_name = "TYPE", value_parser = parse_block_quant, requires = "best_of")]
    pub reward_quantize: Option<GgmlDType>,
}

impl BestOfArgs {
    pub fn reward_args(&self, offline: bool) -> Option<RewardArgs> {
        Some(RewardArgs {
            model: self.reward_model.clone()?,
            tokenizer: self.reward_tokenizer.clone(),
            template: self.reward_template.clone(),
            readout: "last".into(),
            offline,
            for_best_of: true,
        })
    }

    pub fn dtype(&self) -> DTypeChoice {
        dtype_choice(self.reward_dtype)
    }
}

fn dtype_choice(arg: Option<DTypeArg>) -> DTypeChoice {
    match arg {
        None => DTypeChoice::Auto,
        Some(DTypeArg::F32) => DTypeChoice::Fixed(DType::F32),
        Some(DTypeArg::F16) => DTypeChoice::Fixed(DType::F16),
        Some(DTypeArg::Bf16) => DTypeChoice::Fixed(DType::BF16),
    }
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The model to read: a directory, a .gguf file, a known name, a hub repo, or
    /// synthetic:SHAPE (random weights of mistral-7b, llama-7b, tiny or a config.json).
    pub model: String,
    /// The GGUF file to write.
    pub output: PathBuf,
    /// q4k (written as llama.cpp's Q4_K_M mix: Q6_K output), q5k, q6k, q8_0, q4_0, f16, bf16 or f32.
    #[arg(long = "type", short = 't', value_name = "TYPE", default_value = "q4k", value_parser = parse_quant)]
    pub qtype: GgmlDType,
    /// The vocabulary, when the model has none (synthetic models): a SentencePiece
    /// tokenizer.model, or a GGUF file's vocabulary (e.g. llama.cpp's
    /// ggml-vocab-llama-bpe.gguf for a Llama 3 shape).
    #[arg(long, value_name = "FILE")]
    pub vocab: Option<PathBuf>,
    /// Use only the local cache, never the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Measure a model of this shape built in memory instead of --model:
    /// mistral-7b, llama-7b, tiny, or a config.json path.
    #[arg(long, value_name = "SHAPE", conflicts_with = "model")]
    pub synthetic: Option<String>,
    /// Prompt tokens to process (0: no prompt test, generation from an
    /// empty cache, as llama-bench's -p 0).
    #[arg(short = 'p', long = "prompt-tokens", default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate after the prompt.
    #[arg(short = 'n', long = "gen-tokens", default_value_t = 128)]
    pub gen_tokens: usize,
    /// Repetitions (the median and the spread are reported).
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub repetitions: usize,
    /// The machine's memory read bandwidth in GB/s, for the generation
    /// ceiling (default: measured by a short read probe after the runs).
    #[arg(long, value_name = "GB/S", value_parser = positive_gbps)]
    pub bandwidth: Option<f64>,
    /// Sequences decoded together through the engine, as llama-batched-bench's
    /// -npl: a list (1,2,4,8). Each stream has its own prompt of -p tokens and
    /// answers -n tokens; prints aggregate and per-stream speeds per B.
    #[arg(long, value_name = "B,...", value_delimiter = ',',
          value_parser = clap::value_parser!(u16).range(1..=256).map(usize::from))]
    pub parallel: Vec<usize>,
    /// With --parallel: prompt rows per engine step. Default: B × p up to 512,
    /// as llama-batched-bench feeds them (its -ub); with --gap-prompt: 16.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536).map(|n| n as usize))]
    pub batch_tokens: Option<usize>,
    /// With --parallel (and --gap-prompt): one JSON object per line instead of a table.
    #[arg(long, requires = "parallel")]
    pub json: bool,
    /// Also measure how long a running stream pauses while a prompt of N
    /// tokens arrives (read in --batch-tokens chunks between its tokens).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    pub gap_prompt: Option<usize>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// A known name or a hub repo owner/name[@revision].
    pub model: String,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// A known name or a hub repo owner/name.
    pub model: String,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A model directory, a known name (starling-lm-7b-beta, starling-lm-7b-alpha,
    /// starling-7b) or a hub repo owner/name[@revision].
    /// Also a .gguf file, or a hub repo of GGUF files with a quantization tag:
    /// owner/name:Q4_K_M.
    #[arg(long, short = 'm', default_value = crate::source::known::DEFAULT_MODEL)]
    pub model: String,
    /// The GGUF file to run from a hub repo (or directory) holding several.
    #[arg(long, value_name = "NAME")]
    pub gguf_file: Option<String>,
    /// Use only the local cache, never the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// Chat template: auto (the model's chat_template, else a built-in), openchat,
    /// openchat-code, vicuna, llama2, raw.
    #[arg(long, default_value = "auto")]
    pub template: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights dtype. Default: the checkpoint's own on CUDA; on CPU f16 and bf16
    /// checkpoints keep theirs (bf16: f32 activations, prompts through bf16
    /// products on AVX512_BF16 CPUs), f32 ones run in f32 (f16 when f32 would
    /// not fit in memory).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// CPU threads for the model, 1 to 1024. Default: the physical cores (or RAYON_NUM_THREADS).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_THREADS as i64))]
    pub threads: Option<u16>,
    /// Quantize the weights while loading: q4k, q5k, q6k, q8_0 or q4_0 (a dense
    /// checkpoint then runs in ~4.5–8.5 bits per weight, no conversion step).
    #[arg(long, value_name = "TYPE", value_parser = parse_block_quant)]
    pub quantize: Option<GgmlDType>,
    /// KV cache dtype. Default on the CPU: f16 for quantized and half-precision
    /// weights (half the memory, as llama.cpp), f32 for f32 weights (exact).
    #[arg(long, value_enum, value_name = "TYPE")]
    pub kv_type: Option<KvTypeArg>,
    /// Read the weights from the file's memory map for the whole run. By default,
    /// once the model has started, an idle-priority thread moves them into the
    /// process's own memory, which generation streams faster (about 10% on a 7B
    /// Q4_K_M here), and replaces Q4_K and Q6_K matrices with repacked copies of
    /// their size (made by the first generated token if not done by then), which every
    /// token then reads through the prompt kernels' sums. That needs free memory
    /// the size of the file plus 1 GB and is skipped without it.
    #[arg(long)]
    pub keep_mapped: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KvTypeArg {
    F32,
    F16,
}

/// `--bandwidth`: a finite number of GB/s above zero (the ceiling divides by it).
fn positive_gbps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e6 => Ok(v),
        Ok(_) => Err(format!(
            "{s} is not a bandwidth in GB/s (above 0, at most 1e6)"
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_quant(s: &str) -> Result<GgmlDType, String> {
    crate::model::linear::parse_quant(s).map_err(|e| e.to_string())
}

/// `--quantize` takes only block formats; float formats are `--dtype`'s job.
fn parse_block_quant(s: &str) -> Result<GgmlDType, String> {
    let q = parse_quant(s)?;
    if !crate::model::linear::is_block_format(q) {
        return Err(format!(
            "{s} is not a quantized format (q4k, q5k, q6k, q8_0, q4_0); use --dtype {s}"
        ));
    }
    Ok(q)
}

/// How the engine shares the model between sequences.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Sequences decoded together, one KV slot each (`run --each-line` answers
    /// this many lines at once). Default: 4 for run, 1 for chat.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: Option<u16>,
    /// Prompt rows per forward pass, on top of a decode row for every running
    /// sequence (a smaller value shortens the pause a long prompt causes in
    /// running answers; under 16, prompts are read more slowly). Each row
    /// holds about 0.2 MB of activations during a step of a 7B model.
    #[arg(long, value_name = "N", default_value_t = crate::engine::DEFAULT_BATCH_TOKENS,
          value_parser = clap::value_parser!(u32).range(1..=65536).map(|n| n as usize))]
    pub batch_tokens: usize,
    /// Positions per sequence, prompt and answer. Default: the model's context,
    /// capped so that every slot fits in half the available memory (the GPU's on CUDA).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    pub ctx_size: Option<usize>,
}

impl EngineArgs {
    pub fn config(&self, default_parallel: usize) -> crate::engine::EngineConfig {
        crate::engine::EngineConfig {
            parallel: self.parallel.map_or(default_parallel, usize::from),
            batch_tokens: self.batch_tokens,
            context: self.ctx_size,
        }
    }
}

impl DeviceArgs {
    /// `--kv-type` applied to a loaded model (nothing when not given).
    pub fn apply_kv_type(&self, model: &mut crate::model::Model) {
        match self.kv_type {
            None => {}
            Some(KvTypeArg::F32) => model.set_kv_dtype(DType::F32),
            Some(KvTypeArg::F16) => model.set_kv_dtype(DType::F16),
        }
    }

    pub fn dtype(&self) -> DTypeChoice {
        dtype_choice(self.dtype)
    }
}

#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long = "max-tokens", short = 'n', default_value_t = 512)]
    pub max_tokens: usize,
    /// 0 = greedy. Default: generation_config.json's, else 0.8.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Keep the k most likely tokens (0 = off). Default 40.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the most likely tokens up to this probability mass (1 = off). Default 0.95.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Drop tokens less likely than min_p × the most likely one (0 = off). Default 0.05.
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f64>,
    /// Penalise recently seen tokens (1 = off). Default 1.0.
    #[arg(long, allow_negative_numbers = true)]
    pub repeat_penalty: Option<f32>,
    /// How many recent tokens the penalty looks at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed; the same seed gives the same answer. Default: random.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// Command line over generation_config.json over starling's defaults.
    pub fn resolve(&self, generation: &GenerationConfig) -> Result<SamplerConfig> {
        let defaults = SamplerConfig::default();
        let config = SamplerConfig {
            temperature: self
                .temperature
                .or(generation.temperature)
                .unwrap_or(defaults.temperature),
            top_k: self.top_k.or(generation.top_k).unwrap_or(defaults.top_k),
            top_p: self.top_p.or(generation.top_p).unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: self
                .repeat_penalty
                .or(generation.repetition_penalty)
                .unwrap_or(defaults.repeat_penalty),
            repeat_last_n: self.repeat_last_n,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: self.seed.unwrap_or_else(random_seed),
        };
        config.validate()?;
        Ok(config)
    }
}

fn random_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (nanos as u64) ^ (u64::from(std::process::id()) << 32)
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The prompt. With stdin too, the prompt comes first, then a blank line, then stdin.
    pub prompt: Option<String>,
    /// A conversation as JSON [{"role", "content"}]; the answer continues it.
    #[arg(long, value_name = "FILE", conflicts_with = "each_line")]
    pub messages: Option<PathBuf>,
    #[command(flatten)]
    pub answer: AnswerArgs,
    /// Answer each line of stdin as a separate prompt.
    #[arg(long)]
    pub each_line: bool,
    /// Print one JSON object per answer instead of streaming text (with
    /// --best-of: every choice with its score).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub best_of: BestOfArgs,
}

/// What shapes every answer, in `run` and `chat` alike.
#[derive(Debug, Args)]
pub struct AnswerArgs {
    /// A system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Stop an answer when this text appears (not printed). Repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print each answer's timings on stderr (logfmt).
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A conversation as JSON [{"role", "content"}], tokenized as the model would see it.
    #[arg(long, value_name = "FILE")]
    pub messages: Option<PathBuf>,
    /// Text to tokenize (after `--`); BOS is prepended as the tokenizer does.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub text: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub answer: AnswerArgs,
    /// Start from a saved conversation (JSON, as /save writes it).
    #[arg(long, value_name = "FILE")]
    pub load: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on (another than 127.0.0.1 opens the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// An API key clients must send (`Authorization: Bearer KEY`); repeatable.
    /// Also read from STARLING_API_KEY. /health needs none.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,
    /// An origin browsers may call the API from (CORS), e.g.
    /// http://localhost:3000; repeatable; `*` for any.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Another name clients may give as `model`.
    #[arg(long, value_name = "NAME")]
    pub alias: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Most sequences that may wait for a slot; a request beyond it gets 429
    /// with Retry-After. Default: no limit.
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,
    /// Seconds in-flight requests may run after SIGTERM or SIGINT.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Do not serve the chat page at `/`.
    #[arg(long)]
    pub no_web: bool,
}

impl Command {
    /// `--threads`, for the commands that run a model.
    pub fn threads(&self) -> Option<u16> {
        match self {
            Command::Run(a) => a.device.threads,
            Command::Chat(a) => a.device.threads,
            Command::Bench(a) => a.device.threads,
            Command::Serve(a) => a.device.threads,
            Command::Score(a) => a.device.threads,
            _ => None,
        }
    }
}
