//! A PyTorch `data.pkl`: starling's bounded unpickler and state-dict reader.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = starling::weights::pickle::tensors_in(data, "archive");
});
