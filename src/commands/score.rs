//! `starling score`: the reward of a conversation, or a ranking of
//! candidate answers, from a reward model (`crate::reward`).

use super::input;
use crate::cli::{RewardArgs, ScoreArgs};
use crate::engine::{EngineConfig, Handle};
use crate::loader::{self, DTypeChoice};
use crate::model::PREFILL_CHUNK;
use crate::reward::{Readout, RewardModel, RewardOptions, wait_reward};
use crate::source::hub::{HubOptions, Parts};
use crate::source::{self, ModelFiles, ModelSpec, known};
use crate::template::Message;
use crate::template::reward::RewardTemplate;
use crate::tokenizer::TokenizerFiles;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use candle_core::quantized::GgmlDType;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::mpsc;

/// What one input asks: the reward of a conversation, or the ranking of
/// several answers to one prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Conversation(Vec<Message>),
    Ranking {
        system: Option<String>,
        prompt: String,
        responses: Vec<String>,
    },
}

impl Item {
    /// `[{"role", "content"}, ...]`, `{"messages": [...]}` or
    /// `{"prompt": "...", "responses": ["...", ...]}`.
    pub fn parse(text: &str) -> Result<Self> {
        const SHAPES: &str = r#"expected [{"role", "content"}, ...], {"messages": [...]} or {"prompt": "...", "responses": ["...", ...]} (and optionally "system")"#;
        // A byte-order mark is not part of the document.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let value: Value = serde_json::from_str(text).context("not valid JSON")?;
        let messages = |v: Value| -> Result<Vec<Message>> {
            let shape = || {
                anyhow::anyhow!(
                    "\"messages\" must be an array of {{\"role\": string, \"content\": string}}"
                )
            };
            // Nothing but role and content: a key the scorer would ignore
            // (a "name", a misspelt "contnet") is refused instead.
            if let Value::Array(list) = &v
                && let Some(extra) = list.iter().find_map(|m| {
                    m.as_object()?
                        .keys()
                        .find(|k| !matches!(k.as_str(), "role" | "content"))
                })
            {
                bail!(
                    "unexpected key {} in a message (role and content only)",
                    crate::weights::shown(extra)
                );
            }
            serde_json::from_value(v).map_err(|_| shape())
        };
        match value {
            Value::Array(_) => Ok(Self::Conversation(messages(value)?)),
            Value::Object(o) => {
                let keys: Vec<&str> = o.keys().map(String::as_str).collect();
                let allowed: &[&str] = if o.contains_key("messages") {
                    &["messages"]
                } else {
                    &["prompt", "responses", "system"]
                };
                if let Some(extra) = keys.iter().find(|k| !allowed.contains(k)) {
                    bail!("unexpected key {}: {SHAPES}", crate::weights::shown(extra));
                }
                let mut o = o;
                if let Some(m) = o.remove("messages") {
                    return Ok(Self::Conversation(messages(m)?));
                }
                let (Some(prompt), Some(responses)) = (o.remove("prompt"), o.remove("responses"))
                else {
                    bail!("{SHAPES}");
                };
                let text = |v: Value, what: &str| -> Result<String> {
                    v.as_str().map(str::to_string).with_context(|| {
                        if what == "responses" {
                            "\"responses\" must be an array of strings".to_string()
                        } else {
                            format!("\"{what}\" must be a string")
                        }
                    })
                };
                let prompt = text(prompt, "prompt")?;
                let system = o.remove("system").map(|v| text(v, "system")).transpose()?;
                let responses = match responses {
                    Value::Array(list) => list
                        .into_iter()
                        .map(|v| text(v, "responses"))
                        .collect::<Result<Vec<_>>>()?,
                    _ => bail!("\"responses\" must be an array of strings"),
                };
                if responses.is_empty() {
                    bail!("\"responses\" is empty: nothing to rank");
                }
                Ok(Self::Ranking {
                    system,
                    prompt,
                    responses,
                })
            }
            _ => bail!("{SHAPES}"),
        }
    }

    /// How many conversations it asks to score.
    pub fn len(&self) -> usize {
        match self {
            Self::Conversation(_) => 1,
            Self::Ranking { responses, .. } => responses.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every conversation can be judged (see
    /// [`crate::template::reward::check_conversation`]), and the text to
    /// tokenize is bounded: a ranking's prompt counts once per response.
    pub fn check(&self) -> Result<()> {
        let bytes: u64 = match self {
            Self::Conversation(m) => m.iter().map(|m| m.content.len() as u64).sum(),
            Self::Ranking {
                system,
                prompt,
                responses,
            } => {
                let shared = (prompt.len() + system.as_ref().map_or(0, String::len)) as u64;
                responses.iter().map(|r| shared + r.len() as u64).sum()
            }
        };
        if bytes > input::MAX_INPUT_BYTES {
            bail!(
                "this asks to score {} MB of text (a ranking's prompt counts once per response), more than {} MiB",
                bytes / 1_000_000,
                input::MAX_INPUT_BYTES >> 20
            );
        }
        self.conversations()
            .iter()
            .try_for_each(|c| crate::template::reward::check_conversation(c))
    }

    /// The conversations to score: one, or one per response.
    pub fn conversations(&self) -> Vec<Vec<Message>> {
        match self {
            Self::Conversation(m) => vec![m.clone()],
            Self::Ranking {
                system,
                prompt,
                responses,
            } => responses
                .iter()
                .map(|r| {
                    let mut c: Vec<Message> = system
                        .iter()
                        .map(|s| Message::new("system", s.clone()))
                        .collect();
                    c.push(Message::new("user", prompt.clone()));
                    c.push(Message::new("assistant", r.clone()));
                    c
                })
                .collect(),
        }
    }
}

/// Indices of `scores`, best first (ties keep the input order).
pub fn ranking(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

pub fn run(args: &ScoreArgs) -> Result<()> {
    // Input that is not --each-line is read and checked before the model
    // loads; --each-line's lines are scored as they arrive.
    let single = if args.each_line {
        if std::io::stdin().is_terminal() {
            bail!("--each-line reads conversations from stdin, but nothing is piped in");
        }
        None
    } else if let Some(path) = &args.messages {
        let bytes = input::read_file(path)?;
        let text = String::from_utf8(bytes)
            .with_context(|| format!("{} is not valid UTF-8", path.display()))?;
        match Item::parse(&text).with_context(|| path.display().to_string())? {
            item @ Item::Conversation(_) => Some(item),
            Item::Ranking { .. } => bail!(
                "{}: --messages takes a conversation; rank answers with {{\"prompt\", \"responses\"}} on stdin",
                path.display()
            ),
        }
    } else {
        let text = input::piped_stdin()?
            .filter(|t| !t.trim().is_empty())
            .context(
                "nothing to score: give --messages FILE, pipe a conversation in, or use --each-line",
            )?;
        Some(Item::parse(&text).context("standard input")?)
    };
    if let Some(item) = &single {
        item.check()?;
    }
    let device = loader::device(&args.device.device)?;
    let mut rm = load_reward(
        &args.reward,
        args.device.dtype(),
        args.device.quantize,
        &device,
    )?;
    args.device.apply_kv_type(&mut rm.model);
    if rm.readout == Readout::Card && rm.template == RewardTemplate::ChatMl {
        eprintln!(
            "note: --readout card is the 7B card's pad read-out (llama2-rm); the ChatML card reads the last token, as `last` does"
        );
    }
    if args.verbose {
        eprintln!(
            "reward model: trunk {}.*, template {}, {} weights, load_s={:.3}",
            rm.trunk,
            rm.template.name(),
            rm.model.weight_format(),
            rm.load_s
        );
    }
    let parallel = fitting_parallel(&rm, args.parallel)?;
    let max_len = rm.model.max_len();
    let rm = rm.into_engine(reward_engine_config(parallel, max_len))?;
    let start = std::time::Instant::now();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut scored = 0;
    if let Some(item) = single {
        let scores = rm.score_all(&item.conversations())?;
        scored += scores.len();
        let line = match item {
            Item::Conversation(_) if !args.json => scores[0].to_string(),
            Item::Conversation(_) => json!({ "score": scores[0] }).to_string(),
            Item::Ranking { .. } => {
                json!({ "scores": scores, "ranking": ranking(&scores) }).to_string()
            }
        };
        writeln!(out, "{line}")?;
    } else {
        // Lines are queued as they come (many share each pass over the
        // weights) and answered in input order, each as soon as it and
        // those before it are done; a bad line answers with an error in
        // its place.
        let lines = input::spawn_line_reader(256, |line| {
            Item::parse(line).and_then(|item| item.check().map(|()| item))
        });
        let mut pending: VecDeque<(usize, Result<Queued>)> = VecDeque::new();
        let (mut open, mut failed, mut total) = (true, 0, 0);
        // Conversations queued at most: enough to fill every slot several
        // times over, few enough that answers keep coming and memory stays
        // bounded whatever the input's rate.
        let most = 8 * parallel.max(8);
        let mut queued_conversations = 0;
        loop {
            while open && queued_conversations < most {
                let next = if pending.is_empty() {
                    lines.recv().ok()
                } else {
                    match lines.try_recv() {
                        Ok(next) => Some(next),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => None,
                    }
                };
                let Some((n, item)) = next else {
                    open = false;
                    break;
                };
                total += 1;
                if let Ok(item) = &item {
                    queued_conversations += item.len();
                }
                let queued = item.and_then(|item| {
                    let handles = item
                        .conversations()
                        .iter()
                        .map(|c| rm.submit(c))
                        .collect::<Result<Vec<_>>>()?;
                    Ok((matches!(item, Item::Ranking { .. }), handles))
                });
                pending.push_back((n, queued));
            }
            let Some((n, queued)) = pending.pop_front() else {
                break;
            };
            if let Ok((_, handles)) = &queued {
                queued_conversations -= handles.len();
            }
            let result = queued.and_then(|(ranked, handles)| {
                let scores = handles
                    .into_iter()
                    .map(wait_reward)
                    .collect::<Result<Vec<f32>>>()?;
                Ok((ranked, scores))
            });
            let line = match result {
                Ok((false, scores)) => {
                    scored += 1;
                    json!({ "line": n, "score": scores[0] })
                }
                Ok((true, scores)) => {
                    scored += scores.len();
                    json!({ "line": n, "scores": scores, "ranking": ranking(&scores) })
                }
                Err(e) => {
                    failed += 1;
                    let message = format!("line {n}: {}", super::error_line(&e));
                    json!({ "line": n, "error": { "message": message } })
                }
            };
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        if total == 0 {
            bail!("--each-line: stdin holds nothing to score");
        }
        if failed > 0 {
            bail!("{failed} of {total} lines could not be scored (see their \"error\" lines)");
        }
    }
    out.flush()?;
    if args.verbose {
        let s = start.elapsed().as_secs_f64();
        eprintln!(
            "scored={scored} score_s={s:.3} per_conversation_s={:.4}",
            s / scored.max(1) as f64
        );
    }
    Ok(())
}

/// A queued line: whether it ranks responses, and its requests.
type Queued = (bool, Vec<Handle>);

/// `--parallel`, or (not given) 8 sequences, fewer when their KV caches
/// would not fit in half the memory available where the caches live (then said).
fn fitting_parallel(rm: &RewardModel, asked: Option<usize>) -> Result<usize> {
    const DEFAULT: usize = 8;
    if let Some(p) = asked {
        return Ok(p); // the engine refuses what does not fit, naming what would
    }
    let per_sequence =
        crate::reward::max_tokens(rm.model.max_len()) * rm.model.kv_bytes_per_position();
    let fit = loader::memory_available_on(rm.model.device())
        .map(|bytes| (bytes / 2 / per_sequence.max(1) as u64) as usize)
        .unwrap_or(DEFAULT);
    if fit == 0 {
        return Err(anyhow::anyhow!(
            "even one conversation's KV cache ({:.1} GB for {} positions) does not fit in half the {} available: try --kv-type f16, or --quantize",
            per_sequence as f64 / 1e9,
            crate::reward::max_tokens(rm.model.max_len()),
            loader::memory_kind(rm.model.device())
        ));
    }
    if fit < DEFAULT {
        let what = if fit == 1 {
            "one conversation"
        } else {
            "conversations"
        };
        eprintln!(
            "note: scoring {fit} {what} at a time: the KV caches of {DEFAULT} would not fit in half the {} available",
            loader::memory_kind(rm.model.device())
        );
    }
    Ok(fit.min(DEFAULT))
}

/// The reward model `args` names, its tokenizer, and its template,
/// resolved (downloading if needed) but not loaded.
pub struct RewardSource {
    pub files: ModelFiles,
    pub tokenizer: TokenizerFiles,
    pub template: RewardTemplate,
}

pub fn resolve_reward(args: &RewardArgs) -> Result<RewardSource> {
    // Flags as the command at hand spells them.
    let (template_flag, tokenizer_flag) = if args.for_best_of {
        ("--reward-template", "--reward-tokenizer")
    } else {
        ("--template", "--tokenizer")
    };
    let spec = ModelSpec::parse(&args.model)?;
    let known = match &spec {
        ModelSpec::Hub(m) => known::by_repo(&m.repo),
        ModelSpec::Local(_) => None,
    };
    if let Some(k) = known
        && !k.is_reward()
    {
        bail!(
            "{} is a chat model, not a reward model (starling-rm-7b, starling-rm-34b)",
            k.name
        );
    }
    let which = || {
        anyhow::anyhow!(
            "which format does {} read? give {template_flag} llama2-rm (Llama-2 [INST], Starling-RM-7B-alpha's) or chatml-rm (Starling-RM-34B's)",
            args.model
        )
    };
    let named = match args.template.as_str() {
        "auto" => None,
        name => Some(RewardTemplate::builtin(name).context(template_flag)?),
    };
    // An unknown hub repo is not downloaded only to ask for its format.
    if named.is_none() && known.is_none() && matches!(spec, ModelSpec::Hub(_)) {
        return Err(which());
    }
    let options = HubOptions::from_env(args.offline);
    let files = source::resolve(&spec, options.with_parts(Parts::NoTokenizer))?;
    // What the files are comes first: a chat model or a GGUF is refused
    // as such, whatever else is missing.
    crate::reward::open(&files, None)?;
    let template = match (named, known) {
        (Some(t), _) => t,
        (None, Some(k)) => RewardTemplate::builtin(k.template)?,
        (None, None) => return Err(which()),
    };
    let has_own =
        files.tokenizer.tokenizer_json.is_some() || files.tokenizer.sentencepiece_model.is_some();
    let tokenizer = match (&args.tokenizer, has_own, known.and_then(|k| k.tokenizer)) {
        (Some(t), _, _) => source::resolve_tokenizer(&ModelSpec::parse(t)?, options)
            .with_context(|| format!("loading the tokenizer {t}"))?,
        (None, true, _) => files.tokenizer.clone(),
        (None, false, Some(repo)) => source::resolve_tokenizer(&ModelSpec::parse(repo)?, options)
            .with_context(|| {
                format!(
                    "{} ships no tokenizer; its card takes {repo}'s (or give {tokenizer_flag} DIR|REPO)",
                    args.model
                )
            })?,
        (None, false, None) => bail!(
            "{} ships no tokenizer: give {tokenizer_flag} DIR|REPO (the tokenizer it was trained with)",
            files.dir.display()
        ),
    };
    Ok(RewardSource {
        files,
        tokenizer,
        template,
    })
}

/// The engine settings for reward models: every input fits in the cards'
/// 2048 tokens, and prompts are all there is to read, so a step takes as
/// many prompt rows as a chunk holds.
pub fn reward_engine_config(parallel: usize, max_len: usize) -> EngineConfig {
    EngineConfig {
        parallel,
        batch_tokens: PREFILL_CHUNK,
        context: Some(crate::reward::max_tokens(max_len)),
    }
}

/// The reward model `args` names, loaded.
pub fn load_reward(
    args: &RewardArgs,
    dtype: DTypeChoice,
    quantize: Option<GgmlDType>,
    device: &Device,
) -> Result<RewardModel> {
    let source = resolve_reward(args)?;
    load_resolved(&source, args, dtype, quantize, device)
}

pub fn load_resolved(
    source: &RewardSource,
    args: &RewardArgs,
    dtype: DTypeChoice,
    quantize: Option<GgmlDType>,
    device: &Device,
) -> Result<RewardModel> {
    let options = RewardOptions {
        template: source.template,
        readout: Readout::parse(&args.readout)?,
        dtype,
        quantize,
    };
    RewardModel::load(&source.files, &source.tokenizer, &options, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_in_three_shapes() {
        let conv =
            Item::parse(r#"[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]"#)
                .unwrap();
        assert_eq!(conv.conversations().len(), 1);
        let wrapped = Item::parse(
            r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#,
        )
        .unwrap();
        assert_eq!(conv, wrapped);
        let rank = Item::parse(r#"{"prompt":"q","responses":["a","b","c"]}"#).unwrap();
        let convs = rank.conversations();
        assert_eq!(convs.len(), 3);
        assert_eq!(convs[2][1], Message::new("assistant", "c"));
        for bad in [
            "",
            "3",
            "{}",
            r#"{"prompt":"q"}"#,
            r#"{"prompt":"q","responses":[]}"#,
            r#"{"prompt":1,"responses":["a"]}"#,
            r#"{"messages":"x"}"#,
        ] {
            assert!(Item::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranking_is_best_first_and_stable() {
        assert_eq!(ranking(&[0.5, 2.0, -1.0, 2.0]), vec![1, 3, 0, 2]);
        assert_eq!(ranking(&[f32::NAN, 1.0]).len(), 2);
    }
}
