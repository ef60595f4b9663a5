//! A safetensors file opened as starling opens weights (memory-mapped),
//! and one tensor read from it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path =
        std::env::temp_dir().join(format!("starling-fuzz-{}.safetensors", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(w) = starling::weights::Weights::open(std::slice::from_ref(&path)) {
        let _ = w.tensor(
            "model.norm.weight",
            &[64],
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        );
    }
});
