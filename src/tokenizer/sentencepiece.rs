//! SentencePiece BPE models (`tokenizer.model`) converted natively to a
//! `tokenizers::Tokenizer` with the layout of the published Mistral/OpenChat
//! `tokenizer.json` files, so both sources give the same ids.
//!
//! The conversion works on a plain piece list (piece, score, kind): the same
//! list a GGUF file carries, so a GGUF vocabulary can feed it too.

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

/// What SentencePiece says a piece is.
/// The longest piece accepted, and the most split lookups (the sum of the
/// squares of the pieces' lengths) a conversion may do: a 256k vocabulary
/// of 16-byte pieces needs 2^26.
const MAX_PIECE_BYTES: u64 = 1024;
const MAX_SPLIT_WORK: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceKind {
    /// SentencePiece's type number, which GGUF's `tokenizer.ggml.token_type` shares.
    pub fn to_proto(self) -> i32 {
        match self {
            Self::Normal => 1,
            Self::Unknown => 2,
            Self::Control => 3,
            Self::UserDefined => 4,
            Self::Unused => 5,
            Self::Byte => 6,
        }
    }

    /// The kind of a type number; absent or unknown numbers are normal pieces.
    pub fn from_proto(t: Option<i32>) -> Self {
        match t.unwrap_or(1) {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceKind,
}

/// A SentencePiece vocabulary and the settings the conversion depends on.
#[derive(Debug, Clone, Default)]
pub struct SpmVocab {
    pub pieces: Vec<Piece>,
    pub add_dummy_prefix: bool,
}

/// The subset of sentencepiece_model.proto that the conversion reads.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, repeated, tag = "1")]
        pub pieces: Vec<SentencePiece>,
        #[prost(message, optional, tag = "2")]
        pub trainer_spec: Option<TrainerSpec>,
        #[prost(message, optional, tag = "3")]
        pub normalizer_spec: Option<NormalizerSpec>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SentencePiece {
        #[prost(string, optional, tag = "1")]
        pub piece: Option<String>,
        #[prost(float, optional, tag = "2")]
        pub score: Option<f32>,
        #[prost(int32, optional, tag = "3")]
        pub r#type: Option<i32>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TrainerSpec {
        #[prost(int32, optional, tag = "3")]
        pub model_type: Option<i32>,
        #[prost(bool, optional, tag = "35")]
        pub byte_fallback: Option<bool>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NormalizerSpec {
        #[prost(bool, optional, tag = "3")]
        pub add_dummy_prefix: Option<bool>,
    }
}

impl SpmVocab {
    /// Parses a serialized SentencePiece `ModelProto`.
    pub fn from_model_bytes(bytes: &[u8]) -> Result<Self> {
        use prost::Message;
        let model = proto::ModelProto::decode(bytes)
            .context("not a SentencePiece model (protobuf did not parse)")?;
        if model.pieces.is_empty() {
            bail!("the SentencePiece model has no pieces");
        }
        // model_type: 1 = unigram (the proto default), 2 = BPE.
        let kind = model
            .trainer_spec
            .as_ref()
            .and_then(|t| t.model_type)
            .unwrap_or(1);
        if kind != 2 {
            bail!("only BPE SentencePiece models are supported (this one has model_type {kind})");
        }
        let add_dummy_prefix = model
            .normalizer_spec
            .as_ref()
            .and_then(|n| n.add_dummy_prefix)
            .unwrap_or(true);
        let pieces = model
            .pieces
            .into_iter()
            .map(|p| Piece {
                text: p.piece.unwrap_or_default(),
                score: p.score.unwrap_or(0.0),
                kind: PieceKind::from_proto(p.r#type),
            })
            .collect();
        Ok(Self {
            pieces,
            add_dummy_prefix,
        })
    }

    /// Builds the tokenizer: vocab in piece order; merges = every split of a
    /// piece into two vocab pieces, ordered by the piece's score, descending
    /// (ties keep piece order, and within a piece the (left id, right id)
    /// order), exactly as transformers' legacy converter wrote the published files.
    /// The vocabulary as a SentencePiece `tokenizer.model` (a BPE model
    /// with byte fallback): what [`Self::from_model_bytes`] reads. Tests
    /// build tiny vocabularies with it.
    pub fn to_model_bytes(&self) -> Vec<u8> {
        use prost::Message;
        proto::ModelProto {
            pieces: self
                .pieces
                .iter()
                .map(|p| proto::SentencePiece {
                    piece: Some(p.text.clone()),
                    score: Some(p.score),
                    r#type: Some(p.kind.to_proto()),
                })
                .collect(),
            trainer_spec: Some(proto::TrainerSpec {
                model_type: Some(2),
                byte_fallback: Some(true),
            }),
            normalizer_spec: Some(proto::NormalizerSpec {
                add_dummy_prefix: Some(self.add_dummy_prefix),
            }),
        }
        .encode_to_vec()
    }

    pub fn to_tokenizer(&self) -> Result<Tokenizer> {
        // Finding each piece's merges looks up every split of it: quadratic
        // in its length. Real pieces are a few dozen bytes; a hostile one of
        // megabytes would take hours.
        let mut work = 0u64;
        for (i, p) in self.pieces.iter().enumerate() {
            let n = p.text.len() as u64;
            if n > MAX_PIECE_BYTES {
                bail!("piece {i} is {n} bytes long (at most {MAX_PIECE_BYTES})");
            }
            work += n * n;
        }
        if work > MAX_SPLIT_WORK {
            bail!("the vocabulary's pieces are too long in total to convert");
        }
        let ids: HashMap<&str, u32> = self
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.text.as_str(), i as u32))
            .collect();
        let unk = self
            .pieces
            .iter()
            .find(|p| p.kind == PieceKind::Unknown)
            .map(|p| p.text.clone())
            .unwrap_or_else(|| "<unk>".to_string());

        let mut merges: Vec<(u32, u32, f32)> = Vec::new();
        let mut local: Vec<(u32, u32)> = Vec::new();
        for piece in &self.pieces {
            // Control and unknown pieces score 0 in the converter's view.
            let score = match piece.kind {
                PieceKind::Control | PieceKind::Unknown => 0.0,
                _ => piece.score,
            };
            local.clear();
            for (split, _) in piece.text.char_indices().skip(1) {
                let (l, r) = piece.text.split_at(split);
                if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                    local.push((li, ri));
                }
            }
            local.sort_unstable();
            merges.extend(local.iter().map(|&(l, r)| (l, r, score)));
        }
        // Stable: equal scores keep the order built above.
        merges.sort_by(|a, b| b.2.total_cmp(&a.2));

        let text = |id: u32| self.pieces[id as usize].text.clone();
        let vocab: tokenizers::models::bpe::Vocab =
            ids.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let merges: Vec<(String, String)> = merges
            .into_iter()
            .map(|(l, r, _)| (text(l), text(r)))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk)
            .fuse_unk(true)
            .byte_fallback(true)
            .build()
            .map_err(|e| anyhow::anyhow!("building the BPE model: {e}"))?;

        let mut tokenizer = Tokenizer::new(bpe);
        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        if self.add_dummy_prefix {
            normalizers.push(Prepend::new("▁".to_string()).into());
        }
        normalizers.push(Replace::new(" ", "▁").map_err(anyhow::Error::msg)?.into());
        tokenizer
            .with_normalizer(Some(NormalizerSequence::new(normalizers)))
            .map_err(anyhow::Error::from_boxed)?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            tokenizers::decoders::DecoderWrapper::Replace(
                Replace::new("▁", " ").map_err(anyhow::Error::msg)?,
            ),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if self.add_dummy_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));

        // Control and unknown pieces are special tokens; user-defined ones are
        // matched in text but are not special.
        let specials: Vec<AddedToken> = self
            .pieces
            .iter()
            .filter(|p| matches!(p.kind, PieceKind::Control | PieceKind::Unknown))
            .map(|p| AddedToken::from(p.text.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(specials)
            .map_err(anyhow::Error::from_boxed)?;
        let user: Vec<AddedToken> = self
            .pieces
            .iter()
            .filter(|p| p.kind == PieceKind::UserDefined)
            .map(|p| AddedToken::from(p.text.clone(), false))
            .collect();
        tokenizer
            .add_tokens(user)
            .map_err(anyhow::Error::from_boxed)?;

        if let Some(&bos) = ids.get("<s>") {
            let processor = TemplateProcessing::builder()
                .try_single("<s> $A")
                .map_err(anyhow::Error::msg)?
                .try_pair("<s> $A <s> $B")
                .map_err(anyhow::Error::msg)?
                .special_tokens(vec![("<s>", bos)])
                .build()
                .map_err(|e| anyhow::anyhow!("building the BOS post-processor: {e}"))?;
            tokenizer.with_post_processor(Some(processor));
        }
        Ok(tokenizer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_piece_is_refused_before_the_quadratic_split_search() {
        let piece = |text: String| Piece {
            text,
            score: 0.0,
            kind: PieceKind::Normal,
        };
        let long = SpmVocab {
            pieces: vec![piece("a".repeat(200_000))],
            add_dummy_prefix: true,
        };
        let start = std::time::Instant::now();
        let Err(err) = long.to_tokenizer() else {
            panic!("a 200,000-byte piece was accepted")
        };
        assert!(err.to_string().contains("bytes long"), "{err}");
        assert!(start.elapsed().as_secs_f64() < 0.5);
        let many = SpmVocab {
            pieces: (0..2000)
                .map(|i| piece(format!("{i}{}", "b".repeat(1000))))
                .collect(),
            add_dummy_prefix: true,
        };
        assert!(many.to_tokenizer().is_err());
    }
}
