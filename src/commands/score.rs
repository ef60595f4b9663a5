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
use crate::template::reward::{REWARD_MAX_TOKENS, RewardTemplate};
use crate::tokenizer::TokenizerFiles;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use candle_core::quantized::GgmlDType;
use serde_json::{Value, json};
use std::io::{BufRead, IsTerminal, Write};

/// What one input asks: the reward of a conversation, or the ranking of
/// several answers to one prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Conversation(Vec<Message>),
    Ranking {
        prompt: String,
        responses: Vec<String>,
    },
}

impl Item {
    /// `[{"role", "content"}, ...]`, `{"messages": [...]}` or
    /// `{"prompt": "...", "responses": ["...", ...]}`.
    pub fn parse(text: &str) -> Result<Self> {
        const SHAPES: &str = r#"expected [{"role", "content"}, ...], {"messages": [...]} or {"prompt": "...", "responses": ["...", ...]}"#;
        let value: Value = serde_json::from_str(text).context("not valid JSON")?;
        let messages = |v: Value| -> Result<Vec<Message>> {
            let m: Vec<Message> = serde_json::from_value(v)
                .context("\"messages\" must be an array of {\"role\", \"content\"} strings")?;
            Ok(m)
        };
        match value {
            Value::Array(_) => Ok(Self::Conversation(messages(value)?)),
            Value::Object(mut o) => {
                if let Some(m) = o.remove("messages") {
                    return Ok(Self::Conversation(messages(m)?));
                }
                let (Some(prompt), Some(responses)) = (o.remove("prompt"), o.remove("responses"))
                else {
                    bail!("{SHAPES}");
                };
                let prompt: String =
                    serde_json::from_value(prompt).context("\"prompt\" must be a string")?;
                let responses: Vec<String> = serde_json::from_value(responses)
                    .context("\"responses\" must be an array of strings")?;
                if responses.is_empty() {
                    bail!("\"responses\" is empty: nothing to rank");
                }
                Ok(Self::Ranking { prompt, responses })
            }
            _ => bail!("{SHAPES}"),
        }
    }

    /// Whether every conversation can be judged (see
    /// [`crate::template::reward::check_conversation`]).
    pub fn check(&self) -> Result<()> {
        self.conversations()
            .iter()
            .try_for_each(|c| crate::template::reward::check_conversation(c))
    }

    /// The conversations to score: one, or one per response.
    pub fn conversations(&self) -> Vec<Vec<Message>> {
        match self {
            Self::Conversation(m) => vec![m.clone()],
            Self::Ranking { prompt, responses } => responses
                .iter()
                .map(|r| {
                    vec![
                        Message::new("user", prompt.clone()),
                        Message::new("assistant", r.clone()),
                    ]
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
    // Every input is read and checked before the model loads.
    let items: Vec<(Option<usize>, Result<Item>)> = if args.each_line {
        read_lines()?
    } else if let Some(path) = &args.messages {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let text = String::from_utf8(bytes)
            .with_context(|| format!("{} is not valid UTF-8", path.display()))?;
        match Item::parse(&text).with_context(|| path.display().to_string())? {
            item @ Item::Conversation(_) => vec![(None, Ok(item))],
            Item::Ranking { .. } => bail!(
                "{}: --messages takes a conversation; rank answers with {{\"prompt\", \"responses\"}} on stdin",
                path.display()
            ),
        }
    } else {
        let text = input::piped_stdin()?.context(
            "nothing to score: give --messages FILE, pipe a conversation in, or use --each-line",
        )?;
        vec![(None, Ok(Item::parse(&text).context("standard input")?))]
    };
    if !args.each_line
        && let Some((_, Ok(item))) = items.first()
    {
        // Outside --each-line, a bad conversation is an error before loading.
        item.check()?;
    }
    let device = loader::device(&args.device.device)?;
    let rm = load_reward(
        &args.reward,
        args.device.dtype(),
        args.device.quantize,
        &device,
    )?;
    if args.verbose {
        eprintln!(
            "reward model: trunk {}.*, template {}, {} weights, load_s={:.3}",
            rm.trunk,
            rm.template.name(),
            rm.model.weight_format(),
            rm.load_s
        );
    }
    let rm = rm.into_engine(reward_engine_config(args.parallel))?;
    // Everything is queued at once, so the engine reads many conversations
    // in each pass over the weights; results are printed in input order.
    let start = std::time::Instant::now();
    let queued: Vec<Result<(&Item, Vec<Handle>)>> = items
        .iter()
        .map(|(_, item)| {
            let item = item.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let handles = item
                .conversations()
                .iter()
                .map(|c| rm.submit(c))
                .collect::<Result<Vec<_>>>()?;
            Ok((item, handles))
        })
        .collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = 0;
    let mut scored = 0;
    for ((line, _), queued) in items.iter().zip(queued) {
        let result = queued.and_then(|(item, handles)| {
            let scores = handles
                .into_iter()
                .map(wait_reward)
                .collect::<Result<Vec<f32>>>()?;
            Ok((item, scores))
        });
        if let Ok((_, scores)) = &result {
            scored += scores.len();
        }
        match (result, line) {
            (Ok((Item::Conversation(_), scores)), _) if !args.json && !args.each_line => {
                writeln!(out, "{}", scores[0])?;
            }
            (Ok((Item::Conversation(_), scores)), _) => {
                writeln!(out, "{}", json!({ "score": scores[0] }))?;
            }
            (Ok((Item::Ranking { .. }, scores)), _) => {
                let ranking = ranking(&scores);
                writeln!(out, "{}", json!({ "scores": scores, "ranking": ranking }))?;
            }
            (Err(e), Some(n)) => {
                failed += 1;
                let message = format!("line {n}: {}", super::error_line(&e));
                writeln!(
                    out,
                    "{}",
                    json!({ "error": { "message": message, "line": n } })
                )?;
            }
            (Err(e), None) => return Err(e),
        }
        out.flush()?;
    }
    if args.verbose {
        let s = start.elapsed().as_secs_f64();
        eprintln!(
            "scored={scored} score_s={s:.3} per_conversation_s={:.4}",
            s / scored.max(1) as f64
        );
    }
    if failed > 0 {
        bail!(
            "{failed} of {} lines could not be scored (see their \"error\" lines)",
            items.len()
        );
    }
    Ok(())
}

/// `--each-line`: every non-blank stdin line, parsed (a bad one keeps its
/// place as an error, so outputs stay aligned with inputs).
fn read_lines() -> Result<Vec<(Option<usize>, Result<Item>)>> {
    if std::io::stdin().is_terminal() {
        bail!("--each-line reads conversations from stdin, but nothing is piped in");
    }
    let mut items = Vec::new();
    let mut stdin = std::io::stdin().lock();
    let mut bytes = Vec::new();
    for n in 1.. {
        bytes.clear();
        if stdin
            .read_until(b'\n', &mut bytes)
            .context("reading standard input")?
            == 0
        {
            break;
        }
        let item = match std::str::from_utf8(&bytes) {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => Item::parse(line).and_then(|item| item.check().map(|()| item)),
            Err(e) => Err(anyhow::anyhow!(
                "not valid UTF-8 (invalid byte at column {})",
                e.valid_up_to() + 1
            )),
        };
        items.push((Some(n), item));
    }
    if items.is_empty() {
        bail!("--each-line: stdin holds nothing to score");
    }
    Ok(items)
}

/// The reward model `args` names, its tokenizer, and its template,
/// resolved (downloading if needed) but not loaded.
pub struct RewardSource {
    pub files: ModelFiles,
    pub tokenizer: TokenizerFiles,
    pub template: RewardTemplate,
}

pub fn resolve_reward(args: &RewardArgs) -> Result<RewardSource> {
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
    let template = match (args.template.as_str(), known) {
        ("auto", Some(k)) => RewardTemplate::builtin(k.template)?,
        ("auto", None) => bail!(
            "which format does {} read? give --template llama2-rm (Llama-2 [INST], Starling-RM-7B-alpha's) or chatml-rm (Starling-RM-34B's)",
            args.model
        ),
        (name, _) => RewardTemplate::builtin(name)?,
    };
    let options = HubOptions::from_env(args.offline);
    let files = source::resolve(&spec, options.with_parts(Parts::NoTokenizer))?;
    let has_own =
        files.tokenizer.tokenizer_json.is_some() || files.tokenizer.sentencepiece_model.is_some();
    let tokenizer = match (&args.tokenizer, has_own, known.and_then(|k| k.tokenizer)) {
        (Some(t), _, _) => source::resolve_tokenizer(&ModelSpec::parse(t)?, options)
            .with_context(|| format!("loading the tokenizer {t}"))?,
        (None, true, _) => files.tokenizer.clone(),
        (None, false, Some(repo)) => source::resolve_tokenizer(&ModelSpec::parse(repo)?, options)
            .with_context(|| {
            format!(
                "{} ships no tokenizer; its card takes {repo}'s (or give --tokenizer DIR|REPO)",
                args.model
            )
        })?,
        (None, false, None) => bail!(
            "{} ships no tokenizer: give --tokenizer DIR|REPO (the tokenizer it was trained with)",
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
pub fn reward_engine_config(parallel: usize) -> EngineConfig {
    EngineConfig {
        parallel,
        batch_tokens: PREFILL_CHUNK,
        context: Some(REWARD_MAX_TOKENS),
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
