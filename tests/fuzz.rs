//! In-process fuzzing of everything that reads a file or a string from
//! outside: seeded mutations of valid tiny files, each loaded through the
//! library code the CLI runs (`source::local_dir` → `loader::load` → the
//! chat template → a prefill and one sampled token).
//!
//! Every case must end in `Ok`, or in an `Err` whose message is one line;
//! never a panic, never more than 1 GB allocated at once (a counting global
//! allocator refuses more, which aborts naming the case) and never more
//! than 5 s (a watchdog aborts naming the case: out-of-memory and stack
//! overflow abort rather than unwind, so they cannot be caught). About a
//! hundred of the cases also run through the real binary.
//!
//! Mutations: bit flips, truncation at every header boundary (GGUF fields,
//! pickle opcodes, the safetensors length), integer fields overwritten with
//! 0, 1, -1, 2^31, 2^63 and 2^64-1, lengths inflated, strings emptied or
//! blown up, arrays duplicated, keys dropped. The seed is fixed, so a
//! failure names a case that reproduces.

mod common;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::{Value, json};
use starling::model::{Config, synthetic};
use starling::tokenizer::sentencepiece::{Piece, PieceKind, SpmVocab};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ---- Guards: memory, time, the case's name ----

/// Counts live heap bytes; refuses an allocation that would take the total
/// past `LIMIT` (set per case), which makes Rust abort: the name of the
/// case is printed first.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
static CASE_NAME: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];
static CASE_START_MS: AtomicU64 = AtomicU64::new(0);
static REPORTED: AtomicBool = AtomicBool::new(false);

const MEMORY_BUDGET: usize = 1 << 30;
const TIME_BUDGET: Duration = Duration::from_secs(5);

fn set_case_name(name: &str) {
    let mut bytes = [0u8; 128];
    let n = name.len().min(128);
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    for (i, slot) in CASE_NAME.iter().enumerate() {
        slot.store(
            u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap()),
            Ordering::Relaxed,
        );
    }
}

/// Writes the case's name to stderr without allocating.
fn report(why: &str) {
    if REPORTED.swap(true, Ordering::SeqCst) {
        return;
    }
    let mut bytes = [0u8; 128];
    for (i, slot) in CASE_NAME.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&slot.load(Ordering::Relaxed).to_le_bytes());
    }
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(128);
    let mut err = std::io::stderr();
    let _ = err.write_all(b"\nfuzz: case ");
    let _ = err.write_all(&bytes[..len]);
    let _ = err.write_all(why.as_bytes());
    let _ = err.write_all(b"\n");
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        if live > LIMIT.load(Ordering::Relaxed) {
            LIVE.fetch_sub(size, Ordering::Relaxed);
            report(" allocated more than 1 GB");
            return std::ptr::null_mut();
        }
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let grow = new_size - layout.size();
            let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
            if live > LIMIT.load(Ordering::Relaxed) {
                LIVE.fetch_sub(grow, Ordering::Relaxed);
                report(" allocated more than 1 GB");
                return std::ptr::null_mut();
            }
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn start_watchdog() {
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let start = CASE_START_MS.load(Ordering::Relaxed);
            if start != 0 && now_ms().saturating_sub(start) > TIME_BUDGET.as_millis() as u64 {
                report(" ran longer than 5 s");
                std::process::abort();
            }
        }
    });
}

// ---- Deterministic randomness ----

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTS: [u64; 6] = [0, 1, u64::MAX, 1 << 31, 1 << 63, u64::MAX - 1];

// ---- Valid tiny files ----

fn tiny_vocab() -> SpmVocab {
    let mut pieces = vec![
        Piece {
            text: "<unk>".into(),
            score: 0.0,
            kind: PieceKind::Unknown,
        },
        Piece {
            text: "<s>".into(),
            score: 0.0,
            kind: PieceKind::Control,
        },
        Piece {
            text: "</s>".into(),
            score: 0.0,
            kind: PieceKind::Control,
        },
    ];
    for b in 0..=255u8 {
        pieces.push(Piece {
            text: format!("<0x{b:02X}>"),
            score: 0.0,
            kind: PieceKind::Byte,
        });
    }
    let words = [
        "▁", "e", "l", "o", "h", "i", "a", "t", "s", "r", "n", "▁h", "▁t", "he", "ll", "lo", "▁he",
        "hi", "▁hi", "el", "▁hello", "ello", "▁the", "th", "er", "▁a", "in", "re",
    ];
    for (i, w) in words.iter().enumerate() {
        pieces.push(Piece {
            text: (*w).into(),
            score: -(i as f32),
            kind: PieceKind::Normal,
        });
    }
    SpmVocab {
        pieces,
        add_dummy_prefix: true,
    }
}

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

fn config(vocab: usize, hidden: usize, layers: usize) -> Value {
    json!({
        "architectures": ["MistralForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": hidden / 4, "max_position_embeddings": 256,
        "sliding_window": 128, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": false
    })
}

struct Bases {
    /// safetensors + tokenizer.json + tokenizer_config.json (chat template)
    dense: PathBuf,
    sharded: PathBuf,
    pytorch: PathBuf,
    /// tokenizer.model instead of tokenizer.json
    spm: PathBuf,
    gguf: BTreeMap<&'static str, PathBuf>,
    messages: PathBuf,
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn bases(root: &Path) -> Bases {
    let vocab = tiny_vocab();
    let n = vocab.pieces.len();
    let cfg_json = config(n, 64, 2);
    let cfg = Config::from_json(&cfg_json.to_string()).unwrap();
    let tok_config = json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE});
    let common_files = |dir: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        write_json(&dir.join("config.json"), &cfg_json);
        write_json(&dir.join("tokenizer_config.json"), &tok_config);
        vocab
            .to_tokenizer()
            .unwrap()
            .save(dir.join("tokenizer.json"), false)
            .unwrap();
    };
    let dense = root.join("dense");
    common_files(&dense);
    synthetic::write_safetensors(&cfg, &dense).unwrap();

    let sharded = root.join("sharded");
    common_files(&sharded);
    let tensors = synthetic::tensors(&cfg);
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (part, file) in [
        (a, "model-00001-of-00002.safetensors"),
        (b, "model-00002-of-00002.safetensors"),
    ] {
        synthetic::save_f32(part, &sharded.join(file)).unwrap();
        for (name, _, _) in part {
            map.insert(name.clone(), file.into());
        }
    }
    write_json(
        &sharded.join("model.safetensors.index.json"),
        &json!({"metadata": {}, "weight_map": map}),
    );

    let pytorch = root.join("pytorch");
    common_files(&pytorch);
    common::save_pytorch_f32(&tensors, &pytorch.join("pytorch_model.bin"));

    let spm = root.join("spm");
    common_files(&spm);
    std::fs::remove_file(spm.join("tokenizer.json")).unwrap();
    std::fs::write(spm.join("tokenizer.model"), vocab.to_model_bytes()).unwrap();
    synthetic::write_safetensors(&cfg, &spm).unwrap();

    // GGUF: hidden 256 so Q4_K's 256-value blocks fit the rows.
    let gcfg = Config::from_json(&config(n, 256, 1).to_string()).unwrap();
    let mut gguf = BTreeMap::new();
    for (name, dtype) in [
        ("f32", GgmlDType::F32),
        ("q8_0", GgmlDType::Q8_0),
        ("q4k", GgmlDType::Q4K),
    ] {
        let tensors: Vec<(String, QTensor)> = synthetic::tensors(&gcfg)
            .into_iter()
            .map(|(name, shape, values)| {
                let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap();
                let kind = if shape.len() == 1 {
                    GgmlDType::F32
                } else {
                    dtype
                };
                (name, QTensor::quantize(&t, kind).unwrap())
            })
            .collect();
        let path = root.join(format!("tiny-{name}.gguf"));
        let header = starling::weights::gguf::GgufHeader {
            name: "fuzz",
            config: &gcfg,
            vocab: &starling::tokenizer::Vocab::SentencePiece(vocab.clone()),
            chat_template: Some(TEMPLATE),
            file_type: starling::weights::gguf::file_type(dtype),
        };
        starling::weights::gguf::write(&path, &header, tensors).unwrap();
        gguf.insert(name, path);
    }
    let messages = root.join("messages.json");
    write_json(
        &messages,
        &json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "the hello"}]),
    );
    Bases {
        dense,
        sharded,
        pytorch,
        spm,
        gguf,
        messages,
    }
}

/// One valid input per cargo-fuzz target (fuzz/fuzz_targets), and the real
/// chat templates when they have been fetched.
fn write_seeds(dir: &Path, b: &Bases) {
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    for (name, path) in &b.gguf {
        put(
            "gguf",
            &format!("{name}.gguf"),
            &std::fs::read(path).unwrap(),
        );
    }
    let mut z =
        zip::ZipArchive::new(std::fs::File::open(b.pytorch.join("pytorch_model.bin")).unwrap())
            .unwrap();
    let mut pickle = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name("archive/data.pkl").unwrap(), &mut pickle).unwrap();
    put("pickle", "data.pkl", &pickle);
    put(
        "safetensors",
        "model.safetensors",
        &std::fs::read(b.dense.join("model.safetensors")).unwrap(),
    );
    put(
        "sentencepiece",
        "tokenizer.model",
        &std::fs::read(b.spm.join("tokenizer.model")).unwrap(),
    );
    put(
        "tokenizer_json",
        "tokenizer.json",
        &std::fs::read(b.dense.join("tokenizer.json")).unwrap(),
    );
    put("template", "tiny.jinja", TEMPLATE.as_bytes());
    let templates = common::root().join("target/test-assets/templates");
    for entry in std::fs::read_dir(templates).into_iter().flatten().flatten() {
        put(
            "template",
            &entry.file_name().to_string_lossy(),
            &std::fs::read(entry.path()).unwrap(),
        );
    }
}

// ---- Mutators ----

fn flip_bits(base: &[u8], rng: &mut Rng) -> (String, Vec<u8>) {
    let mut out = base.to_vec();
    let n = 1 + rng.below(8);
    for _ in 0..n {
        let at = rng.below(out.len());
        out[at] ^= 1 << rng.below(8);
    }
    (format!("{n} bit flips"), out)
}

fn truncate(base: &[u8], at: usize) -> (String, Vec<u8>) {
    (
        format!("truncated at {at}"),
        base[..at.min(base.len())].to_vec(),
    )
}

fn overwrite(base: &[u8], at: usize, width: usize, value: u64) -> (String, Vec<u8>) {
    let mut out = base.to_vec();
    let bytes = value.to_le_bytes();
    let end = (at + width).min(out.len());
    out[at..end].copy_from_slice(&bytes[..end - at]);
    (format!("{width}-byte field at {at} = {value}"), out)
}

/// Numeric fields of a GGUF header: (offset, width, is a length or count).
fn gguf_fields(b: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut fields = vec![(4, 4, false), (8, 8, true), (16, 8, true)];
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    let (tensors, kvs) = (u64_at(8), u64_at(16));
    let mut p = 24;
    fn value(b: &[u8], p: &mut usize, kind: u32, fields: &mut Vec<(usize, usize, bool)>) {
        let size = match kind {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                fields.push((*p, 8, true));
                let len = u64::from_le_bytes(b[*p..*p + 8].try_into().unwrap()) as usize;
                *p += 8 + len;
                return;
            }
            9 => {
                let inner = u32::from_le_bytes(b[*p..*p + 4].try_into().unwrap());
                fields.push((*p, 4, false));
                fields.push((*p + 4, 8, true));
                let n = u64::from_le_bytes(b[*p + 4..*p + 12].try_into().unwrap());
                *p += 12;
                for _ in 0..n {
                    value(b, p, inner, fields);
                }
                return;
            }
            _ => unreachable!(),
        };
        fields.push((*p, size, false));
        *p += size;
    }
    for _ in 0..kvs {
        value(b, &mut p, 8, &mut fields);
        let kind = u32_at(p);
        fields.push((p, 4, false));
        p += 4;
        value(b, &mut p, kind, &mut fields);
    }
    for _ in 0..tensors {
        value(b, &mut p, 8, &mut fields);
        let dims = u32_at(p) as usize;
        fields.push((p, 4, true));
        p += 4;
        for d in 0..dims {
            fields.push((p + 8 * d, 8, true));
        }
        p += 8 * dims;
        fields.push((p, 4, false));
        fields.push((p + 4, 8, true));
        p += 12;
    }
    fields
}

/// Opcode boundaries of a pickle and the offsets of their integer arguments.
fn pickle_fields(p: &[u8]) -> (Vec<usize>, Vec<(usize, usize)>) {
    let (mut bounds, mut ints) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < p.len() {
        bounds.push(i);
        let op = p[i];
        i += 1;
        match op {
            0x80 | b'K' | b'h' | b'q' => {
                ints.push((i, 1));
                i += 1;
            }
            b'M' => {
                ints.push((i, 2));
                i += 2;
            }
            b'J' | b'j' | b'r' => {
                ints.push((i, 4));
                i += 4;
            }
            b'X' => {
                ints.push((i, 4));
                let n = u32::from_le_bytes(p[i..i + 4].try_into().unwrap()) as usize;
                i += 4 + n;
            }
            b'c' => {
                for _ in 0..2 {
                    while i < p.len() && p[i] != b'\n' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            _ => {}
        }
    }
    (bounds, ints)
}

/// JSON pointers of every node.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                pointers(item, format!("{at}/{i}"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                pointers(
                    item,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        _ => {}
    }
}

fn mutate_json(base: &Value, rng: &mut Rng) -> (String, Value) {
    let mut v = base.clone();
    let mut all = Vec::new();
    pointers(&v, String::new(), &mut all);
    let at = all[rng.below(all.len())].clone();
    let node = v.pointer_mut(&at).unwrap();
    let what = match (node.clone(), rng.below(4)) {
        (Value::Number(_), k) | (Value::Bool(_), k) => {
            let n = INTS[(k + rng.below(INTS.len())) % INTS.len()];
            *node = match rng.below(4) {
                0 => json!(-1),
                1 => json!(1e308),
                _ => json!(n),
            };
            format!("{node} at {at}")
        }
        (Value::String(s), 0) => {
            *node = json!("");
            format!("emptied the string at {at} ({} chars)", s.len())
        }
        (Value::String(s), 1) => {
            *node = json!(s.repeat(50_000 / (s.len() + 1) + 1));
            format!("blew up the string at {at}")
        }
        (Value::String(s), _) => {
            let mut chars: Vec<char> = s.chars().collect();
            let junk = [
                "{%", "%}", "{{", "}}", "\u{0}", "<s>", "\"", "\\", "é", "🦀",
            ];
            let pos = rng.below(chars.len() + 1);
            chars.splice(pos..pos, junk[rng.below(junk.len())].chars());
            if !chars.is_empty() && rng.below(2) == 0 {
                let cut = rng.below(chars.len());
                chars.remove(cut);
            }
            *node = json!(chars.into_iter().collect::<String>());
            format!("edited the string at {at}")
        }
        (Value::Array(items), k) => {
            *node = match k {
                0 => json!([]),
                _ => Value::Array(items.iter().chain(&items).cloned().collect()),
            };
            format!(
                "array at {at} {}",
                if k == 0 { "emptied" } else { "duplicated" }
            )
        }
        (Value::Object(mut map), _) if !map.is_empty() => {
            let key = map.keys().nth(rng.below(map.len())).unwrap().clone();
            map.remove(&key);
            *node = Value::Object(map);
            format!("dropped {key:?} at {at}")
        }
        _ => {
            *node = Value::Null;
            format!("null at {at}")
        }
    };
    (what, v)
}

/// Serialises a safetensors header and its data again (the header's length prefix follows).
fn safetensors_with_header(base: &[u8], header: &Value) -> Vec<u8> {
    let n = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&base[8 + n..]);
    out
}

fn rezip(base: &Path, pickle: &[u8]) -> Vec<u8> {
    let mut zip_in = zip::ZipArchive::new(std::fs::File::open(base).unwrap()).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut out);
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for i in 0..zip_in.len() {
            let mut f = zip_in.by_index(i).unwrap();
            let name = f.name().unwrap().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut data).unwrap();
            w.start_file(&name, stored).unwrap();
            w.write_all(if name.ends_with("data.pkl") {
                pickle
            } else {
                &data
            })
            .unwrap();
        }
        w.finish().unwrap();
    }
    out.into_inner()
}

// ---- Cases ----

struct Case {
    kind: &'static str,
    what: String,
    /// The model (a directory or a .gguf) and the messages file the case uses.
    model: PathBuf,
    messages: PathBuf,
}

/// Lays out `base` in a fresh directory with `file` replaced by `bytes`.
fn case_dir(root: &Path, n: usize, base: &Path, file: &str, bytes: &[u8]) -> PathBuf {
    let dir = root.join(format!("case-{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(base).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != file {
            std::fs::hard_link(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(dir.join(file), bytes).unwrap();
    dir
}

/// What the CLI does with a model and a conversation, in-process.
fn load_and_answer(model: &Path, messages: &Path) -> anyhow::Result<()> {
    let files = starling::source::local_dir(model)?;
    let loaded = starling::loader::load(
        &files,
        "auto",
        starling::loader::DTypeChoice::Auto,
        None,
        &Device::Cpu,
        false,
    )?;
    let conversation = starling::commands::input::read_messages(messages)?;
    let prompt = loaded
        .text
        .template
        .encode(&loaded.text.tokenizer, &conversation)?;
    let mut session = starling::engine::Session::new(loaded.model);
    let (logits, _) = session.prefill(&prompt)?;
    let mut sampler = starling::engine::Sampler::new(starling::engine::SamplerConfig::default());
    sampler.sample(&logits, session.fed())?;
    Ok(())
}

#[test]
fn mutated_inputs_fail_cleanly() {
    let started = Instant::now();
    let root = common::scratch("fuzz");
    let b = bases(&root);
    let cases_root = root.join("cases");
    let mut rng = Rng(0x5eed_f00d);
    // STARLING_FUZZ_SCALE multiplies the random cases (CI runs the default).
    let scale: usize = std::env::var("STARLING_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut cases: Vec<Case> = Vec::new();
    let add = |cases: &mut Vec<Case>,
               kind: &'static str,
               what: String,
               model: PathBuf,
               messages: &Path| {
        cases.push(Case {
            kind,
            what,
            model,
            messages: messages.to_path_buf(),
        });
    };
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };

    // scripts/fuzz.sh seeds cargo-fuzz's corpora with these valid files.
    if let Some(seeds) = std::env::var_os("STARLING_FUZZ_SEEDS") {
        write_seeds(Path::new(&seeds), &b);
    }

    // The unmutated bases load: the harness itself works.
    for model in [&b.dense, &b.sharded, &b.pytorch, &b.spm]
        .into_iter()
        .chain(b.gguf.values())
    {
        load_and_answer(model, &b.messages)
            .unwrap_or_else(|e| panic!("{}: {e:#}", model.display()));
    }

    // GGUF: every header field's boundary, integer overwrites, bit flips.
    for (name, path) in &b.gguf {
        let kind: &'static str = match *name {
            "f32" => "gguf-f32",
            "q8_0" => "gguf-q8_0",
            _ => "gguf-q4k",
        };
        let bytes = std::fs::read(path).unwrap();
        let fields = gguf_fields(&bytes);
        let dir = cases_root.join(kind);
        std::fs::create_dir_all(&dir).unwrap();
        let mut variants = Vec::new();
        // Boundaries: the fixed header, then a sample of the vocabulary's fields, the tensor infos.
        let tensor_fields = fields.len().saturating_sub(9 * 10);
        for (i, &(at, _, _)) in fields.iter().enumerate() {
            if i < 40 || i >= tensor_fields || i % 97 == 0 {
                variants.push(truncate(&bytes, at));
            }
        }
        variants.push(truncate(&bytes, bytes.len() - 1));
        for _ in 0..60 * scale {
            let (at, width, is_len) = fields[rng.below(fields.len())];
            let value = if is_len && rng.below(2) == 0 {
                // A length inflated by a power of two.
                let old = u64::from_le_bytes({
                    let mut w = [0u8; 8];
                    w[..width].copy_from_slice(&bytes[at..at + width]);
                    w
                });
                old.wrapping_add(1 << rng.below(40))
            } else {
                INTS[rng.below(INTS.len())]
            };
            variants.push(overwrite(&bytes, at, width, value));
        }
        for _ in 0..40 * scale {
            variants.push(flip_bits(&bytes, &mut rng));
        }
        for (what, data) in variants {
            let path = dir.join(format!("case-{}.gguf", next()));
            std::fs::write(&path, data).unwrap();
            add(&mut cases, kind, what, path, &b.messages);
        }
    }

    // safetensors: the header as JSON, its length prefix, the data.
    let st = std::fs::read(b.dense.join("model.safetensors")).unwrap();
    let hlen = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&st[8..8 + hlen]).unwrap();
    let mut variants = Vec::new();
    for _ in 0..80 * scale {
        let (what, h) = mutate_json(&header, &mut rng);
        variants.push((format!("header: {what}"), safetensors_with_header(&st, &h)));
    }
    for at in [0, 4, 7, 8, 9, 8 + hlen / 2, 8 + hlen, st.len() - 1] {
        variants.push(truncate(&st, at));
    }
    for v in INTS {
        variants.push(overwrite(&st, 0, 8, v));
    }
    for _ in 0..20 * scale {
        variants.push(flip_bits(&st[..8 + hlen], &mut rng));
        let last = variants.last_mut().unwrap();
        last.1.extend_from_slice(&st[8 + hlen..]);
    }
    for (what, data) in variants {
        let dir = case_dir(&cases_root, next(), &b.dense, "model.safetensors", &data);
        add(&mut cases, "safetensors", what, dir, &b.messages);
    }

    // Sharded safetensors: the index, and one shard.
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(b.sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    for _ in 0..40 * scale {
        let (what, v) = mutate_json(&index, &mut rng);
        let dir = case_dir(
            &cases_root,
            next(),
            &b.sharded,
            "model.safetensors.index.json",
            v.to_string().as_bytes(),
        );
        add(&mut cases, "safetensors-index", what, dir, &b.messages);
    }
    let shard = std::fs::read(b.sharded.join("model-00002-of-00002.safetensors")).unwrap();
    for i in 0..20 * scale {
        let (what, data) = if i % 2 == 0 {
            flip_bits(&shard[..200.min(shard.len())], &mut rng)
        } else {
            truncate(&shard, rng.below(shard.len()))
        };
        let mut data = data;
        if i % 2 == 0 {
            data.extend_from_slice(&shard[200.min(shard.len())..]);
        }
        let dir = case_dir(
            &cases_root,
            next(),
            &b.sharded,
            "model-00002-of-00002.safetensors",
            &data,
        );
        add(&mut cases, "safetensors-shard", what, dir, &b.messages);
    }

    // pytorch_model.bin: the pickle (opcode boundaries, integer arguments,
    // bit flips) inside a valid zip, and the zip's own bytes.
    let bin = b.pytorch.join("pytorch_model.bin");
    let zip_bytes = std::fs::read(&bin).unwrap();
    let pickle = {
        let mut z = zip::ZipArchive::new(std::fs::File::open(&bin).unwrap()).unwrap();
        let mut f = z.by_name("archive/data.pkl").unwrap();
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut v).unwrap();
        v
    };
    let (bounds, ints) = pickle_fields(&pickle);
    let mut variants = Vec::new();
    for (i, &at) in bounds.iter().enumerate() {
        if i < 30 || i % 23 == 0 {
            variants.push(truncate(&pickle, at));
        }
    }
    for _ in 0..50 * scale {
        let (at, width) = ints[rng.below(ints.len())];
        variants.push(overwrite(&pickle, at, width, INTS[rng.below(INTS.len())]));
    }
    for _ in 0..30 * scale {
        variants.push(flip_bits(&pickle, &mut rng));
    }
    for (what, p) in variants {
        let dir = case_dir(
            &cases_root,
            next(),
            &b.pytorch,
            "pytorch_model.bin",
            &rezip(&bin, &p),
        );
        add(
            &mut cases,
            "pytorch-pickle",
            format!("data.pkl {what}"),
            dir,
            &b.messages,
        );
    }
    for _ in 0..30 * scale {
        let (what, data) = if rng.below(2) == 0 {
            flip_bits(&zip_bytes, &mut rng)
        } else {
            truncate(&zip_bytes, rng.below(zip_bytes.len()))
        };
        let dir = case_dir(&cases_root, next(), &b.pytorch, "pytorch_model.bin", &data);
        add(&mut cases, "pytorch-zip", what, dir, &b.messages);
    }

    // tokenizer.model (protobuf).
    let spm = std::fs::read(b.spm.join("tokenizer.model")).unwrap();
    for i in 0..60 * scale {
        let (what, data) = match i % 3 {
            0 => flip_bits(&spm, &mut rng),
            1 => truncate(&spm, rng.below(spm.len())),
            _ => overwrite(
                &spm,
                rng.below(spm.len()),
                1 + rng.below(8),
                INTS[rng.below(INTS.len())],
            ),
        };
        let dir = case_dir(&cases_root, next(), &b.spm, "tokenizer.model", &data);
        add(&mut cases, "tokenizer.model", what, dir, &b.messages);
    }

    // JSON files of a model directory, and a conversation.
    for (kind, file, count) in [
        ("tokenizer.json", "tokenizer.json", 120),
        ("config.json", "config.json", 100),
        ("tokenizer_config.json", "tokenizer_config.json", 120),
    ] {
        let base: Value =
            serde_json::from_str(&std::fs::read_to_string(b.dense.join(file)).unwrap()).unwrap();
        for _ in 0..count * scale {
            let (what, v) = mutate_json(&base, &mut rng);
            let dir = case_dir(
                &cases_root,
                next(),
                &b.dense,
                file,
                v.to_string().as_bytes(),
            );
            add(&mut cases, kind, what, dir, &b.messages);
        }
    }
    let conversation: Value =
        serde_json::from_str(&std::fs::read_to_string(&b.messages).unwrap()).unwrap();
    let dir = cases_root.join("messages");
    std::fs::create_dir_all(&dir).unwrap();
    for _ in 0..80 * scale {
        let (what, v) = mutate_json(&conversation, &mut rng);
        let path = dir.join(format!("messages-{}.json", next()));
        std::fs::write(&path, v.to_string()).unwrap();
        add(&mut cases, "messages", what, b.dense.clone(), &path);
    }
    let bytes = std::fs::read(&b.messages).unwrap();
    for _ in 0..20 * scale {
        let (what, data) = flip_bits(&bytes, &mut rng);
        let path = dir.join(format!("messages-{}.json", next()));
        std::fs::write(&path, data).unwrap();
        add(&mut cases, "messages", what, b.dense.clone(), &path);
    }

    // Run them all in-process, on a thread with the main thread's stack.
    start_watchdog();
    let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut peak_over_baseline = 0usize;
    for (i, case) in cases.iter().enumerate() {
        let name = format!("#{i} {} ({})", case.kind, case.what);
        set_case_name(&name);
        let baseline = LIVE.load(Ordering::Relaxed);
        PEAK.store(baseline, Ordering::Relaxed);
        LIMIT.store(baseline + MEMORY_BUDGET, Ordering::Relaxed);
        CASE_START_MS.store(now_ms(), Ordering::Relaxed);
        let (model, messages) = (case.model.clone(), case.messages.clone());
        let outcome = std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(move || std::panic::catch_unwind(|| load_and_answer(&model, &messages)))
            .unwrap()
            .join()
            .unwrap();
        CASE_START_MS.store(0, Ordering::Relaxed);
        LIMIT.store(usize::MAX, Ordering::Relaxed);
        peak_over_baseline = peak_over_baseline.max(PEAK.load(Ordering::Relaxed) - baseline);
        let entry = counts.entry(case.kind).or_default();
        match outcome {
            Ok(Ok(())) => entry.0 += 1,
            Ok(Err(e)) => {
                entry.1 += 1;
                // Each cause is written on one line at its source; what the
                // user sees (main's error_line) is also short.
                let raw = format!("{e:#}");
                let text = starling::commands::error_line(&e);
                if raw.contains('\n') || text.is_empty() || text.chars().count() > 1500 {
                    let cut: String = raw.chars().take(300).collect();
                    failures.push(format!(
                        "{name}: not a short one-line message ({} bytes): {cut:?}",
                        raw.len()
                    ));
                }
            }
            Err(_) => failures.push(format!("{name}: panicked")),
        }
    }
    let in_process = started.elapsed();

    // About a hundred of the same cases through the real binary.
    let step = (cases.len() / 100).max(1);
    let mut through_binary = 0;
    for (i, case) in cases.iter().enumerate().step_by(step) {
        let name = format!("#{i} {} ({})", case.kind, case.what);
        let (model, messages) = (
            case.model.display().to_string(),
            case.messages.display().to_string(),
        );
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
            .args([
                "run",
                "--model",
                &model,
                "--messages",
                &messages,
                "-n",
                "2",
                "--temperature",
                "0",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                failures.push(format!("{name}: the binary ran longer than 10 s"));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        through_binary += 1;
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {}
            Some(1) => {
                let lines: Vec<&str> = stderr.lines().collect();
                if lines.len() != 1 || !lines[0].starts_with("error: ") {
                    failures.push(format!(
                        "{name}: the binary's error is not one line: {stderr}"
                    ));
                }
            }
            other => failures.push(format!(
                "{name}: the binary exited with {other:?}: {stderr}"
            )),
        }
    }

    let total: usize = counts.values().map(|(ok, err)| ok + err).sum();
    eprintln!(
        "fuzz: {total} cases in-process in {:.1} s, peak allocation {:.1} MB over the baseline; {through_binary} through the binary; {:.1} s in all",
        in_process.as_secs_f64(),
        peak_over_baseline as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    for (kind, (ok, err)) in &counts {
        eprintln!(
            "fuzz:   {kind:<22} {:>4} cases ({ok} loaded, {err} refused)",
            ok + err
        );
    }
    let _ = std::fs::remove_dir_all(&root);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
