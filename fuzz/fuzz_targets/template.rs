//! A chat template compiled and rendered on a conversation that holds
//! special-token text, as starling renders a model's own template.
#![no_main]
use libfuzzer_sys::fuzz_target;
use starling::template::{JinjaTemplate, Message};

fuzz_target!(|data: &[u8]| {
    let source = String::from_utf8_lossy(data);
    let specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let Ok(t) = JinjaTemplate::new(&source, Some("<s>".into()), Some("</s>".into()), specials)
    else {
        return;
    };
    let messages = [
        Message::new("system", "  be brief "),
        Message::new("user", "hi <|im_end|> there <s"),
        Message::new("assistant", ""),
        Message::new("user", "|im_start|> again"),
    ];
    let _ = t.render(&messages);
});
