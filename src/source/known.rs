//! The Starling family by name: each name carries its hub repo and the chat
//! template it was trained with, so `--template` is only needed for unknown
//! models that ship no `chat_template`.

pub struct KnownModel {
    pub name: &'static str,
    pub repo: &'static str,
    pub template: &'static str,
    pub about: &'static str,
}

pub const DEFAULT_MODEL: &str = "starling-lm-7b-beta";

pub const KNOWN: [KnownModel; 3] = [
    KnownModel {
        name: "starling-lm-7b-beta",
        repo: "Nexusflow/Starling-LM-7B-beta",
        template: "openchat",
        about: "Starling-LM-7B-beta (Mistral 7B, OpenChat template) — the default",
    },
    KnownModel {
        name: "starling-lm-7b-alpha",
        repo: "berkeley-nest/Starling-LM-7B-alpha",
        template: "openchat",
        about: "Starling-LM-7B-alpha (Mistral 7B, OpenChat template)",
    },
    KnownModel {
        name: "starling-7b",
        repo: "declare-lab/starling-7B",
        template: "vicuna",
        about: "declare-lab/starling-7B (Llama, Vicuna v1.1 template)",
    },
];

pub fn by_name(name: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|k| k.name.eq_ignore_ascii_case(name))
}

pub fn by_repo(repo: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|k| k.repo.eq_ignore_ascii_case(repo))
}
