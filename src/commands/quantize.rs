//! `starling quantize MODEL OUT.gguf --type q4k`: reads any model starling
//! runs (safetensors, PyTorch, GGUF, or synthetic weights of a real shape),
//! quantizes each matrix with candle's ggml quantizers, and writes a GGUF
//! that starling and llama.cpp both load.

use crate::cli::{ModelArgs, QuantizeArgs};
use crate::model::linear::{self, output_quant};
use crate::model::{Config, synthetic};
use crate::tokenizer::bpe::BpeVocab;
use crate::tokenizer::sentencepiece::{Piece, PieceKind, SpmVocab};
use crate::tokenizer::{TextTokenizer, TokenizerConfig, Vocab};
use crate::weights::Weights;
use crate::weights::gguf::{self, GgufHeader};
use anyhow::{Context, Result, bail};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use std::path::Path;

pub fn run(args: &QuantizeArgs) -> Result<()> {
    let start = std::time::Instant::now();
    let (name, config, weights, vocab, chat_template) = match args.model.strip_prefix("synthetic:")
    {
        Some(shape) => {
            let config = synthetic::shape(shape)?;
            let weights = Weights::synthetic(&config);
            let Some(path) = &args.vocab else {
                bail!("a synthetic model has no vocabulary: pass --vocab tokenizer.model");
            };
            let vocab = if gguf::is_gguf(path) {
                let mut vocab = gguf::read_vocab(path)?;
                match &mut vocab {
                    Vocab::SentencePiece(v) => *v = padded(std::mem::take(v), &config),
                    Vocab::Bpe(v) => {
                        for id in v.tokens.len()..config.vocab_size {
                            v.tokens.push(format!("[PAD{id}]"));
                            v.kinds.push(PieceKind::Unused);
                        }
                    }
                }
                vocab
            } else {
                Vocab::SentencePiece(padded(spm_file(path)?, &config))
            };
            if vocab.len() != config.vocab_size {
                bail!(
                    "{} has {} tokens, more than the shape's vocab_size of {}",
                    path.display(),
                    vocab.len(),
                    config.vocab_size
                );
            }
            (format!("synthetic {shape}"), config, weights, vocab, None)
        }
        None => read_model(args)?,
    };

    // llama.cpp's `llama` architecture has no attention biases.
    if config.family()? != crate::model::Family::Qwen2 && config.attention_biases().contains(&true)
    {
        bail!("writing Llama attention biases (attention_bias) as GGUF is not supported");
    }
    // llama.cpp's rope scaling types are none, linear, yarn and longrope.
    if let crate::model::config::RopeScaling::Dynamic { .. } = config.rope_scaling()? {
        bail!(
            "writing dynamic rope scaling as GGUF is not supported: llama.cpp has no such type (none, linear, yarn, longrope)"
        );
    }
    let shapes = synthetic::tensor_shapes(&config);
    let bar = indicatif::ProgressBar::new(shapes.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("quantizing {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let mut tensors = Vec::with_capacity(shapes.len());
    // Matrices whose rows are not whole blocks of the asked type, and the
    // type they fell back to (as llama-quantize falls back).
    let mut fallbacks: Vec<(String, usize, GgmlDType, GgmlDType)> = Vec::new();
    for (hf, shape) in &shapes {
        if hf == "lm_head.weight" && !weights.contains(hf) && config.tie_word_embeddings {
            continue;
        }
        bar.set_message(hf.clone());
        let dense = weights.tensor(hf, shape, DType::F32, &Device::Cpu)?;
        let q = if shape.len() == 1 {
            // Norm weights stay f32, as llama.cpp keeps them.
            QTensor::quantize(&dense, GgmlDType::F32)?
        } else {
            let target = if hf == "lm_head.weight" {
                output_quant(args.qtype)
            } else {
                args.qtype
            };
            let q = linear::quantize(&dense, target, &Device::Cpu)
                .with_context(|| format!("quantizing {hf}"))?;
            if q.dtype() != target {
                fallbacks.push((hf.clone(), shape[shape.len() - 1], target, q.dtype()));
            }
            std::sync::Arc::try_unwrap(q).expect("a fresh tensor has one owner")
        };
        tensors.push((hf.clone(), q));
        bar.inc(1);
    }
    bar.finish_and_clear();
    // One note per type asked for (`lm_head` asks for its own).
    let mut targets: Vec<GgmlDType> = Vec::new();
    for f in &fallbacks {
        if !targets.contains(&f.2) {
            targets.push(f.2);
        }
    }
    for target in targets {
        let fell: Vec<_> = fallbacks.iter().filter(|f| f.2 == target).collect();
        let (first, cols, _, used) = fell[0];
        eprintln!(
            "note: {} of the matrices are not {target:?} but {used:?} (or wider): their rows of {cols} values are not whole {target:?} blocks of {} ({first} is one)",
            fell.len(),
            target.block_size()
        );
    }
    let bytes: usize = tensors.iter().map(|(_, q)| q.storage_size_in_bytes()).sum();
    let header = GgufHeader {
        name: &name,
        config: &config,
        vocab: &vocab,
        chat_template: chat_template.as_deref(),
        file_type: gguf::file_type(args.qtype),
    };
    gguf::write(&args.output, &header, tensors)?;
    eprintln!(
        "wrote {} ({:?}, {:.2} GB of weights) in {:.1} s",
        args.output.display(),
        args.qtype,
        bytes as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

type Model = (String, Config, Weights, Vocab, Option<String>);

/// A real model's config, weights, vocabulary and chat template.
fn read_model(args: &QuantizeArgs) -> Result<Model> {
    let model_args = ModelArgs {
        model: args.model.clone(),
        offline: args.offline,
        template: "auto".into(),
        gguf_file: None,
    };
    let (files, _) = super::model_files(&model_args)?;
    if files.weights.is_empty() {
        bail!("{} has no weights", files.dir.display());
    }
    let weights = Weights::open(&files.weights)?;
    weights.ensure_not_reward_model(files.origin())?;
    if let Some(g) = weights.gguf() {
        let config = g.config().clone();
        let vocab = g.tokenizer_vocab()?;
        let template = g.chat_template();
        return Ok((general_name(&args.model), config, weights, vocab, template));
    }
    let text = crate::loader::load_text(&files, "auto")?;
    let vocab = match (
        &args.vocab,
        &files.tokenizer.sentencepiece_model,
        &files.tokenizer.tokenizer_json,
    ) {
        (Some(path), _, _) | (None, Some(path), _) => Vocab::SentencePiece(padded(
            with_added_tokens(spm_file(path)?, &text.tokenizer),
            &text.config,
        )),
        // A byte-level BPE tokenizer.json (Llama 3, Qwen2).
        (None, None, Some(json)) => {
            let source = std::fs::read_to_string(json)
                .with_context(|| format!("reading {}", json.display()))?;
            let mut bpe = BpeVocab::from_tokenizer_json(&source, text.config.bos_token_id)
                .with_context(|| format!("{}: a GGUF vocabulary is written from SentencePiece pieces or byte-level BPE (pass --vocab tokenizer.model)", json.display()))?;
            // One token per embedding row, as llama.cpp's converter pads.
            for id in bpe.tokens.len()..text.config.vocab_size {
                bpe.tokens.push(format!("[PAD{id}]"));
                bpe.kinds.push(PieceKind::Unused);
            }
            Vocab::Bpe(bpe)
        }
        (None, None, None) => bail!(
            "{} has no tokenizer.model: a GGUF vocabulary is written from SentencePiece pieces (pass --vocab tokenizer.model)",
            files.dir.display()
        ),
    };
    let template = match &files.tokenizer.tokenizer_config {
        Some(p) => match TokenizerConfig::from_file(p)?.chat_template {
            Some(t) => Some(t.default_template()?.to_string()),
            None => None,
        },
        None => None,
    };
    Ok((
        general_name(&args.model),
        text.config,
        weights,
        vocab,
        template,
    ))
}

fn spm_file(path: &Path) -> Result<SpmVocab> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    SpmVocab::from_model_bytes(&bytes).with_context(|| format!("reading {}", path.display()))
}

/// The SentencePiece pieces followed by the tokens the model's configs add
/// (`<|end_of_turn|>` ...), as the GGUF token list needs every id.
fn with_added_tokens(mut vocab: SpmVocab, tokenizer: &TextTokenizer) -> SpmVocab {
    let specials: std::collections::HashSet<u32> = tokenizer
        .special_tokens()
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    for id in vocab.pieces.len() as u32..tokenizer.vocab_size() as u32 {
        let Some(text) = tokenizer.inner().id_to_token(id) else {
            break;
        };
        let kind = if specials.contains(&id) {
            PieceKind::Control
        } else {
            PieceKind::UserDefined
        };
        vocab.pieces.push(Piece {
            text,
            score: 0.0,
            kind,
        });
    }
    vocab
}

/// Pads the token list to the embedding's rows, as llama.cpp's converter
/// does (`[PAD{id}]`, unused): llama.cpp requires one token per row.
fn padded(mut vocab: SpmVocab, config: &Config) -> SpmVocab {
    for id in vocab.pieces.len()..config.vocab_size {
        vocab.pieces.push(Piece {
            text: format!("[PAD{id}]"),
            score: 0.0,
            kind: PieceKind::Unused,
        });
    }
    vocab
}

/// `general.name`: a repo id as given, a local model by its own name
/// (the directory's, or the file's stem): a shared file should not carry
/// the path it was made from.
fn general_name(model: &str) -> String {
    let Ok(path) = Path::new(model).canonicalize() else {
        return model.to_string();
    };
    let own = if path.is_file() {
        path.file_stem()
    } else {
        path.file_name()
    };
    own.map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
}
