//! A `tokenizer.json` loaded as a model directory's is, then used.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("starling-fuzz-{}.json", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let files = starling::tokenizer::TokenizerFiles {
        tokenizer_json: Some(path),
        ..Default::default()
    };
    if let Ok(t) = starling::tokenizer::TextTokenizer::load(&files, None) {
        if let Ok(ids) = t.encode_with_bos("hello <s> wörld 🦀") {
            let _ = t.decode(&ids);
        }
    }
});
