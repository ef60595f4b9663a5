//! How reward models read a conversation: the formats the Starling reward
//! models were trained on, and their left truncation.
//!
//! A reward model judges a finished exchange, so unlike a chat template the
//! rendering ends with the assistant's answer and its end token, and long
//! inputs lose their start (the answer being judged is at the end).

use super::{Message, Segment, Segments};
use crate::tokenizer::TextTokenizer;
use anyhow::{Result, bail};

/// Tokens a reward model reads at most: both Starling-RM cards truncate
/// their input to 2048 tokens from the left.
pub const REWARD_MAX_TOKENS: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewardTemplate {
    /// Starling-RM-7B-alpha (Llama-2-7B-chat trunk). Its model card formats
    /// one exchange as `<s>[INST] {prompt} </s> [/INST] {response}</s>` and
    /// tokenizes it with the Llama-2 tokenizer, which adds its own BOS, so
    /// the ids start with two BOS. The card defines nothing more; starling
    /// follows the Llama-2 chat convention for the rest: a system message
    /// goes into the first prompt as `<<SYS>>\n{system}\n<</SYS>>\n\n`, and
    /// each exchange is rendered as above, concatenated.
    Llama2,
    /// Starling-RM-34B (Yi-34B-Chat trunk), from its model card: ChatML
    /// without BOS, `<|im_start|>{role}\n{content}<|im_end|>` per message,
    /// joined by `\n`.
    ChatMl,
}

impl RewardTemplate {
    /// The built-in called `name` (`--template` of `starling score`).
    pub fn builtin(name: &str) -> Result<Self> {
        match name {
            "llama2-rm" => Ok(Self::Llama2),
            "chatml-rm" => Ok(Self::ChatMl),
            other => bail!(
                "unknown reward template {:?} (auto, llama2-rm or chatml-rm)",
                other.chars().take(64).collect::<String>()
            ),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Llama2 => "llama2-rm",
            Self::ChatMl => "chatml-rm",
        }
    }

    /// The segments of `messages`, which must end with the assistant's
    /// answer being judged: an optional system message first, then user
    /// and assistant in turn.
    pub fn render(&self, messages: &[Message]) -> Result<Vec<Segment>> {
        check_conversation(messages)?;
        let system = messages
            .first()
            .filter(|m| m.role == "system")
            .map(|m| m.content.as_str());
        let turns = &messages[usize::from(system.is_some())..];
        let mut s = Segments::default();
        match self {
            Self::Llama2 => {
                // The tokenizer's automatic BOS, then the card's own `<s>`.
                s.special("<s>");
                for (i, pair) in turns.chunks(2).enumerate() {
                    s.special("<s>").text("[INST] ");
                    if let (0, Some(sys)) = (i, system) {
                        s.text("<<SYS>>\n").text(sys).text("\n<</SYS>>\n\n");
                    }
                    s.text(&pair[0].content).text(" ").special("</s>");
                    s.text(" [/INST] ").text(&pair[1].content).special("</s>");
                }
            }
            Self::ChatMl => {
                for (i, m) in messages.iter().enumerate() {
                    if i > 0 {
                        s.text("\n");
                    }
                    s.special("<|im_start|>")
                        .text(&m.role)
                        .text("\n")
                        .text(&m.content)
                        .special("<|im_end|>");
                }
            }
        }
        Ok(s.0)
    }

    /// The ids the reward model reads: the rendering encoded (text never
    /// spells a special token), then cut from the left to `max` tokens
    /// ([`REWARD_MAX_TOKENS`] for the Starling models) as the cards'
    /// tokenizers do with `truncation_side = "left"`: for Llama-2 the
    /// automatic BOS is added after the cut (BOS + the last 2047 ids).
    pub fn encode(
        &self,
        tokenizer: &TextTokenizer,
        messages: &[Message],
        max: usize,
    ) -> Result<Vec<u32>> {
        let ids = super::encode_segments(tokenizer, &self.render(messages)?)?;
        Ok(truncate_left(ids, self.keeps_first(), max.max(2)))
    }

    /// Whether the first id is the tokenizer's automatic BOS, kept by the cut.
    fn keeps_first(&self) -> bool {
        matches!(self, Self::Llama2)
    }
}

/// `ids` cut to at most `max` from the left, keeping `ids[0]` in front
/// when `keep_first`.
fn truncate_left(mut ids: Vec<u32>, keep_first: bool, max: usize) -> Vec<u32> {
    if ids.len() <= max {
        return ids;
    }
    let cut = ids.len() - max;
    if keep_first {
        ids.drain(1..1 + cut);
    } else {
        ids.drain(..cut);
    }
    ids
}

/// A judged conversation: not empty, an optional system message first, then
/// user and assistant alternating, ending with the assistant's answer.
pub fn check_conversation(messages: &[Message]) -> Result<()> {
    let Some(last) = messages.last() else {
        bail!("the conversation is empty: a reward model judges an assistant's answer");
    };
    if last.role != "assistant" {
        bail!(
            "the last message is the {}'s: a reward model judges an answer, so the conversation must end with the assistant's",
            last.role.chars().take(32).collect::<String>()
        );
    }
    let start = usize::from(messages[0].role == "system");
    for (i, m) in messages[start..].iter().enumerate() {
        let want = if i % 2 == 0 { "user" } else { "assistant" };
        if m.role != want {
            bail!(
                "message {} is the {}'s where the {want}'s was expected (an optional system message first, then user and assistant in turn)",
                start + i + 1,
                m.role.chars().take(32).collect::<String>()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(segments: &[Segment]) -> String {
        segments
            .iter()
            .map(|s| match s {
                Segment::Text(t) => t.clone(),
                Segment::Special(t) => format!("[{t}]"),
            })
            .collect()
    }

    fn exchange() -> Vec<Message> {
        vec![
            Message::new("user", "Hi?"),
            Message::new("assistant", "Hello."),
        ]
    }

    #[test]
    fn llama2_rm_is_the_cards_format_after_the_automatic_bos() {
        let out = shown(&RewardTemplate::Llama2.render(&exchange()).unwrap());
        assert_eq!(out, "[<s>][<s>][INST] Hi? [</s>] [/INST] Hello.[</s>]");
    }

    #[test]
    fn llama2_rm_puts_the_system_message_in_the_first_prompt_only() {
        let mut msgs = vec![Message::new("system", "S")];
        msgs.extend(exchange());
        msgs.extend(exchange());
        let out = shown(&RewardTemplate::Llama2.render(&msgs).unwrap());
        assert_eq!(
            out,
            "[<s>][<s>][INST] <<SYS>>\nS\n<</SYS>>\n\nHi? [</s>] [/INST] Hello.[</s>][<s>][INST] Hi? [</s>] [/INST] Hello.[</s>]"
        );
    }

    #[test]
    fn chatml_rm_has_no_bos_and_joins_blocks_with_newlines() {
        let mut msgs = vec![Message::new("system", "S")];
        msgs.extend(exchange());
        let out = shown(&RewardTemplate::ChatMl.render(&msgs).unwrap());
        assert_eq!(
            out,
            "[<|im_start|>]system\nS[<|im_end|>]\n[<|im_start|>]user\nHi?[<|im_end|>]\n[<|im_start|>]assistant\nHello.[<|im_end|>]"
        );
    }

    #[test]
    fn a_conversation_must_end_with_the_answer_and_alternate() {
        let t = RewardTemplate::ChatMl;
        let err = |m: &[Message]| t.render(m).unwrap_err().to_string();
        assert!(err(&[]).contains("empty"));
        assert!(err(&[Message::new("user", "q")]).contains("must end with"));
        let twice = [
            Message::new("user", "a"),
            Message::new("user", "b"),
            Message::new("assistant", "c"),
        ];
        assert!(
            err(&twice).contains("message 2 is the user's"),
            "{}",
            err(&twice)
        );
        let late_system = [
            Message::new("user", "a"),
            Message::new("system", "b"),
            Message::new("assistant", "c"),
        ];
        assert!(err(&late_system).contains("message 2"));
    }

    #[test]
    fn user_text_spelling_a_marker_stays_text() {
        let msgs = [
            Message::new("user", "<|im_end|><s>"),
            Message::new("assistant", "</s>[/INST]"),
        ];
        for t in [RewardTemplate::Llama2, RewardTemplate::ChatMl] {
            let specials = t
                .render(&msgs)
                .unwrap()
                .iter()
                .filter(|s| matches!(s, Segment::Special(_)))
                .count();
            assert_eq!(specials, 4, "only the template's markers: {}", t.name());
        }
    }

    #[test]
    fn left_truncation_keeps_the_end_and_the_automatic_bos() {
        let ids: Vec<u32> = (0..10).collect();
        assert_eq!(truncate_left(ids.clone(), true, 4), vec![0, 7, 8, 9]);
        assert_eq!(truncate_left(ids.clone(), false, 4), vec![6, 7, 8, 9]);
        assert_eq!(truncate_left(ids.clone(), true, 10), ids);
    }
}
