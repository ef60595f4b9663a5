//! A SentencePiece `tokenizer.model`, converted and used to encode and decode.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(vocab) = starling::tokenizer::sentencepiece::SpmVocab::from_model_bytes(data) else {
        return;
    };
    if let Ok(t) = starling::tokenizer::TextTokenizer::from_vocab(&vocab) {
        if let Ok(ids) = t.encode_text("hello <s> wörld 🦀") {
            let _ = t.decode(&ids);
        }
    }
});
