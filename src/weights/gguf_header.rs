//! The GGUF header (metadata and tensor directory), read with every number
//! checked against the file's real size before it is used.
//!
//! candle 0.11.1's `gguf_file::Content::read` panics on
//! `general.alignment = 0` (a `div_ceil` by zero), accepts alignments that
//! are not powers of two (and so places the tensor data wrongly), and
//! leaves tensor offsets, sizes and their overlap unchecked. So starling
//! reads the header itself, with llama.cpp's rules (`gguf.cpp`), into
//! candle's `Content`, whose types and writer it keeps using.
//!
//! Layout (GGUF v2/v3, little-endian): magic `GGUF`, u32 version,
//! u64 tensor count, u64 metadata count, the metadata (key string, u32
//! type, value), the tensor infos (name, u32 n_dims, n_dims × u64 dims
//! innermost first, u32 ggml type, u64 offset into the data section), then
//! the data section at the next multiple of `general.alignment` (default 32).

use anyhow::{Result, bail, ensure};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use std::collections::HashMap;
use std::io::Read;

const DEFAULT_ALIGNMENT: u64 = 32;
/// llama.cpp's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are allowed, but not deeper than this.
const MAX_DEPTH: usize = 4;
/// The longest array (the largest real vocabularies hold about 256k
/// tokens and merges); each element costs 32 bytes in memory.
const MAX_ARRAY: u64 = 1 << 24;

/// Counts the bytes read, so every length can be checked against what is
/// left of the file before anything is allocated for it.
struct Reader<R> {
    inner: R,
    pos: u64,
    size: u64,
}

impl<R: Read> Reader<R> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        if self.remaining() < N as u64 {
            bail!("the file ends inside {what} (at byte {})", self.pos);
        }
        self.inner.read_exact(&mut buf)?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A length that must leave room for `count` items of at least `each` bytes.
    fn count(&mut self, what: &str, each: u64) -> Result<u64> {
        let n = self.u64(what)?;
        if n.checked_mul(each)
            .is_none_or(|need| need > self.remaining())
        {
            bail!(
                "{what} is {n}, more than the {} bytes left can hold",
                self.remaining()
            );
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(what, 1)?;
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf)?;
        self.pos += len;
        // Some writers NUL-terminate; llama.cpp's vocabularies may hold
        // bytes that are not UTF-8 (kept as U+FFFD, as candle does).
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<Value> {
        Ok(match kind {
            0 => Value::U8(self.bytes::<1>("a u8")?[0]),
            1 => Value::I8(self.bytes::<1>("an i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes("a u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes("an i16")?)),
            4 => Value::U32(self.u32("a u32")?),
            5 => Value::I32(i32::from_le_bytes(self.bytes("an i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes("an f32")?)),
            7 => match self.bytes::<1>("a bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("a bool holds {b}"),
            },
            8 => Value::String(self.string("a string's length")?),
            9 => {
                ensure!(depth < MAX_DEPTH, "arrays nest deeper than {MAX_DEPTH}");
                let inner = self.u32("an array's type")?;
                let n = self.count("an array's length", min_size(inner)?)?;
                ensure!(
                    n <= MAX_ARRAY,
                    "an array of {n} values (at most {MAX_ARRAY})"
                );
                let mut values = Vec::with_capacity(n.min(4096) as usize);
                for _ in 0..n {
                    values.push(self.value(inner, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64("a u64")?),
            11 => Value::I64(i64::from_le_bytes(self.bytes("an i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes("an f64")?)),
            other => bail!("unknown value type {other}"),
        })
    }
}

/// ggml's type numbers (`ggml.h`) for the types candle can hold
/// (candle's own table is private to it).
fn ggml_type(kind: u32) -> Option<GgmlDType> {
    Some(match kind {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A value's type, in a word (messages never print a whole value).
fn kind_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::U32(_) => "a u32 that is not a power of two",
        _ => "a number of another type",
    }
}

/// The fewest bytes a value of type `kind` takes in the file.
fn min_size(kind: u32) -> Result<u64> {
    Ok(match kind {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        other => bail!("unknown value type {other}"),
    })
}

/// Reads and checks the header of a GGUF file of `size` bytes. The error
/// says what is wrong; the caller names the file.
pub fn read(inner: impl Read, size: u64) -> Result<Content> {
    let mut r = Reader {
        inner: std::io::BufReader::new(inner),
        pos: 0,
        size,
    };
    if &r.bytes::<4>("the magic")? != b"GGUF" {
        bail!("it does not start with \"GGUF\"");
    }
    let magic = match r.u32("the version")? {
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => bail!("version {v} is not supported (2 or 3)"),
    };
    // A tensor info takes at least 8 + 4 + 4 + 8 bytes, a metadata entry 8 + 4 + 1.
    let tensor_count = r.count("the tensor count", 24)?;
    let kv_count = r.count("the metadata count", 13)?;

    let mut metadata = HashMap::new();
    for _ in 0..kv_count {
        let key = r.string("a metadata key's length")?;
        let kind = r.u32("a metadata type")?;
        let value = r
            .value(kind, 0)
            .map_err(|e| anyhow::anyhow!("metadata {}: {e}", super::shown(&key)))?;
        if metadata.contains_key(&key) {
            bail!("metadata {} appears twice", super::shown(&key));
        }
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            bail!(
                "general.alignment is not a power of two as a u32 ({})",
                kind_name(other)
            )
        }
    };

    let mut tensor_infos = HashMap::new();
    let mut extents = Vec::with_capacity(tensor_count.min(4096) as usize);
    for _ in 0..tensor_count {
        let raw_name = r.string("a tensor name's length")?;
        let name = super::shown(&raw_name);
        let n_dims = r.u32("a tensor's dimension count")?;
        ensure!(
            n_dims <= MAX_DIMS,
            "tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})"
        );
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64("a tensor's dimensions")?);
        }
        let kind = r.u32("a tensor's type")?;
        let dtype = ggml_type(kind).ok_or_else(|| match kind {
            // ggml's integer and f64 tensors: real types, never weights.
            24..=28 => {
                let named = ["I8", "I16", "I32", "I64", "F64"][kind as usize - 24];
                anyhow::anyhow!("tensor {name} has type {kind} ({named}), not a weight type")
            }
            _ => anyhow::anyhow!("tensor {name} has an unknown type {kind}"),
        })?;
        let offset = r.u64("a tensor's offset")?;
        let elements = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| anyhow::anyhow!("tensor {name}: dimensions {dims:?} overflow"))?;
        let block = dtype.block_size() as u64;
        let row = dims.first().copied().unwrap_or(1);
        ensure!(
            row % block == 0,
            "tensor {name}: rows of {row} values are not whole {dtype:?} blocks of {block}"
        );
        let bytes = (elements / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| anyhow::anyhow!("tensor {name}: its size overflows"))?;
        ensure!(
            offset % alignment == 0,
            "tensor {name}: offset {offset} is not a multiple of the alignment {alignment}"
        );
        extents.push((offset, bytes, name.clone()));
        let name = raw_name;
        // candle's shapes list the outermost dimension first.
        let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        let info = TensorInfo {
            ggml_dtype: dtype,
            shape: shape.into(),
            offset,
        };
        if tensor_infos.contains_key(&name) {
            bail!("tensor {} appears twice", super::shown(&name));
        }
        tensor_infos.insert(name, info);
    }

    let data_start = r
        .pos
        .checked_next_multiple_of(alignment)
        // A vocabulary-only file (llama.cpp's ggml-vocab-*.gguf) has no
        // tensors and may end without padding to its data section.
        .map(|s| if extents.is_empty() { s.min(size) } else { s })
        .filter(|&s| s <= size)
        .ok_or_else(|| anyhow::anyhow!("the file ends before its tensor data"))?;
    let data_len = size - data_start;
    extents.sort();
    let mut end_of_previous = 0u64;
    for (offset, bytes, name) in &extents {
        let end = offset
            .checked_add(*bytes)
            .filter(|&e| e <= data_len)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "tensor {name} ({bytes} bytes at data offset {offset}) runs past the end of the file ({data_len} bytes of data; truncated?)"
                )
            })?;
        ensure!(
            *offset >= end_of_previous,
            "tensor {name} overlaps the tensor before it"
        );
        end_of_previous = end;
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset: data_start,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A GGUF v3 file built field by field, so that tests can write what no
    /// honest writer would.
    #[derive(Default)]
    pub(crate) struct RawGguf {
        pub kvs: Vec<(String, u32, Vec<u8>)>,
        /// name, dims (innermost first), ggml type, offset
        pub tensors: Vec<(String, Vec<u64>, u32, u64)>,
        pub data: Vec<u8>,
        pub alignment: u64,
    }

    pub(crate) fn string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(s.as_bytes());
        out
    }

    impl RawGguf {
        pub fn kv(mut self, key: &str, kind: u32, value: Vec<u8>) -> Self {
            self.kvs.push((key.to_string(), kind, value));
            self
        }

        pub fn tensor(mut self, name: &str, dims: &[u64], kind: u32, offset: u64) -> Self {
            self.tensors
                .push((name.to_string(), dims.to_vec(), kind, offset));
            self
        }

        pub fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
            for (key, kind, value) in &self.kvs {
                out.extend(string(key));
                out.extend_from_slice(&kind.to_le_bytes());
                out.extend_from_slice(value);
            }
            for (name, dims, kind, offset) in &self.tensors {
                out.extend(string(name));
                out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&kind.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
            }
            let align = if self.alignment == 0 {
                32
            } else {
                self.alignment
            } as usize;
            while !out.len().is_multiple_of(align) {
                out.push(0);
            }
            out.extend_from_slice(&self.data);
            out
        }
    }

    fn check(file: &RawGguf) -> Result<Content> {
        let bytes = file.bytes();
        read(bytes.as_slice(), bytes.len() as u64)
    }

    fn fails(file: &RawGguf, needle: &str) {
        let err = check(file).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(needle), "expected {needle:?} in {err:?}");
        assert!(!err.contains('\n'), "one line: {err:?}");
    }

    #[test]
    fn a_file_without_tensors_may_end_before_the_padding() {
        let file = RawGguf::default().kv("general.architecture", 8, string("llama"));
        let mut bytes = file.bytes();
        // Cut the padding after the metadata, as llama.cpp's vocab files are.
        let header_end = bytes.len() - bytes.iter().rev().take_while(|&&b| b == 0).count();
        bytes.truncate(header_end);
        let content = read(bytes.as_slice(), bytes.len() as u64).unwrap();
        assert!(content.tensor_infos.is_empty());
        // With a tensor, a file that ends there is truncated.
        let mut with_tensor = valid();
        with_tensor.data.clear();
        fails(&with_tensor, "");
    }

    /// Two f32 tensors of 8 values, packed as llama.cpp packs them.
    fn valid() -> RawGguf {
        RawGguf {
            data: vec![0u8; 64],
            ..Default::default()
        }
        .kv("general.architecture", 8, string("llama"))
        .tensor("a", &[8], 0, 0)
        .tensor("b", &[4, 2], 0, 32)
    }

    #[test]
    fn reads_a_valid_file() {
        let content = check(&valid()).unwrap();
        assert_eq!(content.tensor_infos["b"].shape.dims(), &[2, 4]);
        assert_eq!(content.tensor_infos["b"].offset, 32);
        assert!(content.tensor_data_offset.is_multiple_of(32));
    }

    #[test]
    fn alignment_must_be_a_power_of_two_u32() {
        for bad in [0u32, 7, 96] {
            fails(
                &valid().kv("general.alignment", 4, bad.to_le_bytes().to_vec()),
                "general.alignment",
            );
        }
        fails(
            &valid().kv("general.alignment", 10, 32u64.to_le_bytes().to_vec()),
            "general.alignment",
        );
        let ok = RawGguf {
            alignment: 64,
            ..valid()
        }
        .kv("general.alignment", 4, 64u32.to_le_bytes().to_vec());
        let ok = RawGguf {
            tensors: vec![("a".into(), vec![8], 0, 0), ("b".into(), vec![8], 0, 64)],
            data: vec![0u8; 96],
            ..ok
        };
        assert_eq!(check(&ok).unwrap().tensor_data_offset % 64, 0);
    }

    #[test]
    fn tensor_extents_are_checked_against_the_file() {
        fails(
            &valid().tensor("c", &[8], 0, u64::MAX - 31),
            "runs past the end",
        );
        fails(&valid().tensor("c", &[8], 0, 64), "runs past the end");
        fails(&valid().tensor("c", &[8], 0, 0), "overlaps");
        fails(
            &valid().tensor("c", &[8], 0, 4),
            "multiple of the alignment",
        );
        fails(
            &valid().tensor("c", &[1 << 32, 1 << 32, 1 << 32], 0, 64),
            "overflow",
        );
        fails(&valid().tensor("c", &[1, 1, 1, 1, 1], 0, 64), "dimensions");
        fails(&valid().tensor("a", &[8], 0, 64), "appears twice");
        fails(
            &valid().tensor("c", &[8], 26, 64),
            "tensor \"c\" has type 26 (I32), not a weight type",
        );
        // Q4_0 rows must be whole blocks of 32 values.
        fails(&valid().tensor("c", &[16], 2, 64), "blocks");
        fails(&valid().tensor("c", &[8], 99, 64), "unknown type");
    }

    #[test]
    fn a_tensor_without_dimensions_is_a_scalar() {
        let content = check(&valid().tensor("s", &[], 0, 64).kv("pad", 0, vec![0])).map(|_| ());
        // 4 bytes at offset 64 lie past the 64 bytes of data.
        assert!(content.unwrap_err().to_string().contains("past the end"));
        let mut scalar = valid().tensor("s", &[], 0, 64);
        scalar.data.extend_from_slice(&[0u8; 32]);
        assert_eq!(
            check(&scalar).unwrap().tensor_infos["s"].shape.dims(),
            &[] as &[usize]
        );
    }

    #[test]
    fn lengths_and_counts_are_bounded_by_the_file() {
        let mut huge_string = string("x");
        huge_string[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        fails(&valid().kv("k", 8, huge_string), "bytes left");
        let mut array = 0u32.to_le_bytes().to_vec();
        array.extend_from_slice(&(1u64 << 40).to_le_bytes());
        fails(&valid().kv("k", 9, array), "bytes left");
        fails(&valid().kv("k", 13, vec![0]), "unknown value type");
        fails(&valid().kv("k", 7, vec![2]), "bool");
        fails(&valid().kv("general.architecture", 8, string("x")), "twice");
        let mut bytes = valid().bytes();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = read(bytes.as_slice(), bytes.len() as u64).unwrap_err();
        assert!(err.to_string().contains("tensor count"), "{err}");
        // An array of one u8, wrapped in six arrays of one array each.
        let mut deep = 0u32.to_le_bytes().to_vec();
        deep.extend_from_slice(&1u64.to_le_bytes());
        deep.push(0);
        for _ in 0..6 {
            let mut outer = 9u32.to_le_bytes().to_vec();
            outer.extend_from_slice(&1u64.to_le_bytes());
            outer.extend(deep);
            deep = outer;
        }
        fails(&valid().kv("k", 9, deep), "nest");
    }

    #[test]
    fn every_truncation_fails_cleanly() {
        let bytes = valid().bytes();
        for len in 0..bytes.len() {
            let cut = &bytes[..len];
            assert!(
                read(cut, len as u64).is_err(),
                "a file cut at {len} bytes was accepted"
            );
        }
    }
}
