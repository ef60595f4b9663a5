//! A GGUF file's header, then (when it parses) the config and vocabulary
//! starling builds from it, through `Gguf::open` on a file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if starling::weights::gguf_header::read(data, data.len() as u64).is_err() {
        return;
    }
    let path = std::env::temp_dir().join(format!("starling-fuzz-{}.gguf", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(gguf) = starling::weights::gguf::Gguf::open(&path) {
        if let Ok(vocab) = gguf.vocab() {
            if let Ok(t) = starling::tokenizer::TextTokenizer::from_vocab(&vocab) {
                let _ = t.encode_text("hello <s> wörld 🦀");
            }
        }
        let _ = gguf.chat_template();
    }
});
