//! The Starling family by name: each name carries its hub repo and the chat
//! template it was trained with, so `--template` is only needed for unknown
//! models that ship no `chat_template`.

pub struct KnownModel {
    pub name: &'static str,
    pub repo: &'static str,
    pub template: &'static str,
    pub about: &'static str,
    /// Where the tokenizer comes from when the repo ships none (the
    /// Starling reward models name it on their cards).
    pub tokenizer: Option<&'static str>,
}

impl KnownModel {
    /// Whether this is a reward model (`starling score`), not a chat model.
    pub fn is_reward(&self) -> bool {
        self.template.ends_with("-rm")
    }
}

pub const DEFAULT_MODEL: &str = "starling-lm-7b-beta";

pub const KNOWN: [KnownModel; 5] = [
    KnownModel {
        name: "starling-lm-7b-beta",
        repo: "Nexusflow/Starling-LM-7B-beta",
        template: "openchat",
        about: "Starling-LM-7B-beta (Mistral 7B, OpenChat template) — the default",
        tokenizer: None,
    },
    KnownModel {
        name: "starling-lm-7b-alpha",
        repo: "berkeley-nest/Starling-LM-7B-alpha",
        template: "openchat",
        about: "Starling-LM-7B-alpha (Mistral 7B, OpenChat template)",
        tokenizer: None,
    },
    KnownModel {
        name: "starling-7b",
        repo: "declare-lab/starling-7B",
        template: "vicuna",
        about: "declare-lab/starling-7B (Llama, Vicuna v1.1 template)",
        tokenizer: None,
    },
    KnownModel {
        name: "starling-rm-7b",
        repo: "berkeley-nest/Starling-RM-7B-alpha",
        template: "llama2-rm",
        about: "reward model (Llama-2-7B-chat trunk; tokenizer from meta-llama, gated)",
        tokenizer: Some("meta-llama/Llama-2-7b-chat-hf"),
    },
    KnownModel {
        name: "starling-rm-34b",
        repo: "Nexusflow/Starling-RM-34B",
        template: "chatml-rm",
        about: "reward model (Yi-34B-Chat trunk, gated; tokenizer from 01-ai/Yi-34B-Chat)",
        tokenizer: Some("01-ai/Yi-34B-Chat"),
    },
];

pub fn by_name(name: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|k| k.name.eq_ignore_ascii_case(name))
}

pub fn by_repo(repo: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|k| k.repo.eq_ignore_ascii_case(repo))
}
