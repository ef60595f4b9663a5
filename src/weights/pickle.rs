//! PyTorch `.bin` checkpoints: a zip whose `*/data.pkl` pickles the state
//! dict (each tensor a `torch._utils._rebuild_tensor_v2` call naming a
//! storage entry `*/data/<key>`), read lazily, one tensor at a time.
//!
//! starling reads the pickle itself. candle 0.11.1's `pickle` module, on a
//! hostile file: deep-copies memo entries on every `BINGET` and `BINPUT`
//! with no bound (a 300-byte pickle of repeated `BINGET 0, BINGET 0,
//! TUPLE2, BINPUT 0` passes 7 GB in 20 s); drops nested objects
//! recursively (two million `TUPLE1`s overflow the stack and abort);
//! allocates a `BINUNICODE`'s length before reading it; indexes tuples
//! with `Vec::remove` (a short `_rebuild_tensor_v2` argument list panics);
//! and prints a multi-line dump to stderr for each entry it skips. This
//! reader implements the same opcodes with the same value semantics, and
//! counts as it goes: every object it makes (copies included, a string's
//! bytes counted as objects) against [`max_objects`] of the pickle's size,
//! and every object's nesting depth against [`MAX_DEPTH`]. A pickle that
//! passes cannot make it allocate more or recurse deeper. Honest
//! checkpoints stay far below both (about a tenth of an object per pickle
//! byte, depth 5).
//!
//! Opcodes: those of protocol 2 that `torch.save` writes (the set candle
//! reads); anything else is refused.

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Deeper objects are refused (dropping an object recurses once per level).
pub const MAX_DEPTH: u32 = 256;
/// The largest `data.pkl` read (a 70B model's is a few hundred KB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// The largest ratio deflate reaches (about 1032:1): a zip entry claiming
/// more bytes than its compressed data can hold is lying.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// The objects a pickle of `len` bytes may make, counting each string's
/// bytes as objects too: a small multiple of the pickle's size.
pub fn max_objects(len: usize) -> u64 {
    (1 << 20) + 16 * len as u64
}

/// Where one tensor's data is, and what it is.
#[derive(Debug, Clone)]
pub struct PthTensor {
    pub dtype: DType,
    /// Outermost dimension first.
    pub shape: Vec<usize>,
    /// Elements to skip at the start of the storage.
    pub offset: usize,
    /// The zip entry of the storage (`archive/data/0`).
    pub entry: String,
}

/// One `.bin` file: its tensors by name, read on demand.
pub struct PthFile {
    path: PathBuf,
    tensors: HashMap<String, PthTensor>,
    zip: Mutex<zip::ZipArchive<std::io::BufReader<std::fs::File>>>,
}

impl PthFile {
    /// Opens the zip and reads every `data.pkl` in it (the tensors'
    /// descriptions; no tensor data is read).
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| anyhow::anyhow!("not a zip archive: {e}"))?;
        let mut pickles = Vec::new();
        for i in 0..zip.len() {
            let entry = zip
                .by_index_raw(i)
                .map_err(|e| anyhow::anyhow!("zip entry {i}: {e}"))?;
            let name = entry
                .name()
                .map_err(|e| anyhow::anyhow!("zip entry {i}: {e}"))?
                .into_owned();
            if let Some(dir) = name.strip_suffix("data.pkl") {
                pickles.push((i, name.clone(), dir.trim_end_matches('/').to_string()));
            }
        }
        ensure!(!pickles.is_empty(), "the archive holds no data.pkl");
        let mut tensors = HashMap::new();
        for (i, name, dir) in pickles {
            let entry = zip
                .by_index(i)
                .map_err(|e| anyhow::anyhow!("zip entry {name}: {e}"))?;
            let mut bytes = Vec::new();
            entry
                .take(MAX_PICKLE_BYTES + 1)
                .read_to_end(&mut bytes)
                .with_context(|| format!("reading {name}"))?;
            ensure!(
                bytes.len() as u64 <= MAX_PICKLE_BYTES,
                "{name} is larger than {MAX_PICKLE_BYTES} bytes"
            );
            let state = unpickle(&bytes).with_context(|| name.clone())?;
            collect_tensors(state, &dir, &mut tensors).with_context(|| name.clone())?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            zip: Mutex::new(zip),
        })
    }

    pub fn tensors(&self) -> &HashMap<String, PthTensor> {
        &self.tensors
    }

    /// Tensor `name` on the CPU in its stored dtype, its bytes checked
    /// against its storage entry before anything is allocated for them.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .with_context(|| format!("no tensor {name} in {}", self.path.display()))?;
        let elements = info
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .context("its size overflows")?;
        let size = info.dtype.size_in_bytes();
        let (skip, bytes) = info
            .offset
            .checked_mul(size)
            .zip(elements.checked_mul(size))
            .context("its size overflows")?;
        let mut zip = self.zip.lock().expect("zip reader poisoned");
        let mut entry = zip
            .by_name(&info.entry)
            .map_err(|e| anyhow::anyhow!("its data entry {}: {e}", info.entry))?;
        let need = skip as u64 + bytes as u64;
        let (stored, compressed) = (entry.size(), entry.compressed_size());
        if need > stored || stored > compressed.saturating_mul(MAX_DEFLATE_RATIO) {
            bail!(
                "it needs {need} bytes but its data entry {} holds {stored} ({compressed} stored; truncated?)",
                info.entry
            );
        }
        std::io::copy(&mut (&mut entry).take(skip as u64), &mut std::io::sink())
            .with_context(|| format!("reading {}", info.entry))?;
        let mut data = vec![0u8; bytes];
        entry
            .read_exact(&mut data)
            .with_context(|| format!("reading {} (truncated?)", info.entry))?;
        Ok(Tensor::from_raw_buffer(
            &data,
            info.dtype,
            &info.shape,
            &Device::Cpu,
        )?)
    }
}

/// The tensors a `data.pkl` describes (storage entries under `dir`), with
/// every limit of [`PthFile::open`]: what the fuzz targets drive.
pub fn tensors_in(pickle: &[u8], dir: &str) -> Result<HashMap<String, PthTensor>> {
    let mut tensors = HashMap::new();
    collect_tensors(unpickle(pickle)?, dir, &mut tensors)?;
    Ok(tensors)
}

/// A pickled value, with the semantics candle's reader (and torch's
/// `weights_only` unpickler, for what state dicts use) gives it. Payloads
/// that nothing reads are not kept.
#[derive(Debug, Clone)]
enum Obj {
    Mark,
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    /// A class or function: module, name.
    Global(String, String),
    Tuple(Vec<Obj>),
    List(Vec<Obj>),
    Dict(Vec<(Obj, Obj)>),
    /// `callable(*args)`, unevaluated.
    Reduce(Box<Obj>, Box<Obj>),
    /// `obj.__setstate__(state)`, unevaluated (nothing in a state dict needs it).
    Build,
    /// A persistent id (a tensor storage in torch's files).
    Persistent(Box<Obj>),
}

/// An object with what it cost to make (objects, counting its contents)
/// and how deeply it nests.
#[derive(Debug, Clone)]
struct Item {
    obj: Obj,
    size: u64,
    depth: u32,
}

impl Item {
    fn leaf(obj: Obj) -> Self {
        Item {
            obj,
            size: 1,
            depth: 1,
        }
    }
}

/// Runs a pickle; returns the object STOP finds on the stack.
fn unpickle(pickle: &[u8]) -> Result<Obj> {
    let mut vm = Machine {
        input: pickle,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        made: 0,
        limit: max_objects(pickle.len()),
    };
    loop {
        let at = vm.pos;
        if let Some(result) = vm.step().with_context(|| format!("at byte {at}"))? {
            return Ok(result);
        }
    }
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Item>,
    /// Objects made so far (copies included).
    made: u64,
    limit: u64,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        ensure!(
            self.input.len() - self.pos >= n,
            "the pickle ends inside an opcode"
        );
        let out = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.input[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("a GLOBAL name has no end of line")?;
        self.pos += n + 1;
        Ok(String::from_utf8_lossy(&rest[..n]).into_owned())
    }

    /// Counts `objects` new allocations against the limit.
    fn make(&mut self, objects: u64) -> Result<()> {
        self.made = self.made.saturating_add(objects);
        if self.made > self.limit {
            bail!(
                "the pickle expands to more than {} objects (a pickle bomb?)",
                self.limit
            );
        }
        Ok(())
    }

    fn push(&mut self, item: Item) -> Result<()> {
        ensure!(
            item.depth <= MAX_DEPTH,
            "objects nest deeper than {MAX_DEPTH} levels"
        );
        self.make(1)?;
        self.stack.push(item);
        Ok(())
    }

    fn leaf(&mut self, obj: Obj) -> Result<()> {
        self.push(Item::leaf(obj))
    }

    fn pop(&mut self) -> Result<Item> {
        match self.stack.pop() {
            Some(Item { obj: Obj::Mark, .. }) => bail!("an opcode takes a mark as its argument"),
            Some(item) => Ok(item),
            None => bail!("the stack is empty"),
        }
    }

    /// Everything above the topmost mark, which is removed.
    fn pop_to_mark(&mut self) -> Result<Vec<Item>> {
        let mark = self
            .stack
            .iter()
            .rposition(|i| matches!(i.obj, Obj::Mark))
            .context("no mark on the stack")?;
        Ok(self.stack.drain(mark..).skip(1).collect())
    }

    /// A new object made of `parts` (their cost and depth carried over).
    fn compose(&mut self, parts: &[&Item], obj: impl FnOnce() -> Obj) -> Result<()> {
        let size = parts.iter().fold(1u64, |s, p| s.saturating_add(p.size));
        let depth = parts.iter().map(|p| p.depth).max().unwrap_or(0) + 1;
        ensure!(
            depth <= MAX_DEPTH,
            "objects nest deeper than {MAX_DEPTH} levels"
        );
        self.push(Item {
            obj: obj(),
            size,
            depth,
        })
    }

    /// Adds items to the list or dict on top of the stack.
    fn extend_top(&mut self, items: Vec<Item>, pairs: bool) -> Result<()> {
        ensure!(
            !pairs || items.len().is_multiple_of(2),
            "SETITEMS of an odd number of items"
        );
        let top = match self.stack.last_mut() {
            Some(top) if !matches!(top.obj, Obj::Mark) => top,
            _ => bail!("nothing to add to"),
        };
        for item in &items {
            top.size = top.size.saturating_add(item.size);
            top.depth = top.depth.max(item.depth + 1);
        }
        ensure!(
            top.depth <= MAX_DEPTH,
            "objects nest deeper than {MAX_DEPTH} levels"
        );
        match (&mut top.obj, pairs) {
            (Obj::List(list), false) => list.extend(items.into_iter().map(|i| i.obj)),
            (Obj::Dict(dict), true) => {
                let mut it = items.into_iter().map(|i| i.obj);
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.push((k, v));
                }
            }
            (_, false) => bail!("APPEND to something that is not a list"),
            (_, true) => bail!("SETITEM on something that is not a dict"),
        }
        Ok(())
    }

    fn memo_key(&mut self, long: bool) -> Result<u32> {
        if long {
            self.u32()
        } else {
            Ok(u32::from(self.u8()?))
        }
    }

    /// One opcode; the final object once STOP is reached.
    fn step(&mut self) -> Result<Option<Obj>> {
        let op = self.u8()?;
        match op {
            0x80 => {
                self.u8()?; // PROTO
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.make((module.len() + name.len()) as u64)?;
                self.leaf(Obj::Global(module, name))?;
            }
            b'K' => {
                let v = self.u8()?;
                self.leaf(Obj::Int(v.into()))?;
            }
            b'M' => {
                let v = u16::from_le_bytes(self.take(2)?.try_into()?);
                self.leaf(Obj::Int(v.into()))?;
            }
            b'J' => {
                let v = i32::from_le_bytes(self.take(4)?.try_into()?);
                self.leaf(Obj::Int(v.into()))?;
            }
            b'G' => {
                self.take(8)?;
                self.leaf(Obj::Float)?;
            }
            0x8a => {
                // LONG1: a little-endian two's-complement integer.
                let n = self.u8()? as usize;
                ensure!(n <= 8, "a LONG1 of {n} bytes does not fit an i64");
                let bytes = self.take(n)?;
                let mut v: i64 = 0;
                for (i, &b) in bytes.iter().enumerate() {
                    v |= i64::from(b) << (8 * i);
                }
                if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                    v -= 1 << (8 * n);
                }
                self.leaf(Obj::Int(v))?;
            }
            b'X' => {
                let len = self.u32()? as usize;
                let bytes = self.take(len)?;
                let text = std::str::from_utf8(bytes)
                    .context("a BINUNICODE string is not UTF-8")?
                    .to_string();
                self.make(len as u64)?;
                self.push(Item {
                    obj: Obj::Str(text),
                    size: 1 + len as u64,
                    depth: 1,
                })?;
            }
            0x88 | 0x89 => self.leaf(Obj::Bool)?,
            b'N' => self.leaf(Obj::None)?,
            b')' => self.leaf(Obj::Tuple(Vec::new()))?,
            b']' => self.leaf(Obj::List(Vec::new()))?,
            b'}' => self.leaf(Obj::Dict(Vec::new()))?,
            b'(' => {
                self.make(1)?;
                self.stack.push(Item::leaf(Obj::Mark));
            }
            b'Q' => {
                let id = self.pop()?;
                self.compose(&[&id], || Obj::Persistent(Box::new(id.obj.clone())))?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                ensure!(self.stack.len() >= n, "the stack is empty");
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                let parts: Vec<&Item> = items.iter().collect();
                self.compose(&parts, || {
                    Obj::Tuple(items.iter().map(|i| i.obj.clone()).collect())
                })?;
            }
            b't' => {
                let items = self.pop_to_mark()?;
                let parts: Vec<&Item> = items.iter().collect();
                self.compose(&parts, || {
                    Obj::Tuple(items.iter().map(|i| i.obj.clone()).collect())
                })?;
            }
            b'd' => {
                let items = self.pop_to_mark()?;
                ensure!(
                    items.len().is_multiple_of(2),
                    "a DICT of an odd number of items"
                );
                let parts: Vec<&Item> = items.iter().collect();
                self.compose(&parts, || {
                    Obj::Dict(
                        items
                            .chunks(2)
                            .map(|kv| (kv[0].obj.clone(), kv[1].obj.clone()))
                            .collect(),
                    )
                })?;
            }
            b'R' | 0x81 => {
                // REDUCE and NEWOBJ. OrderedDict() (what a state dict is)
                // becomes a dict; anything else stays an unevaluated call.
                let args = self.pop()?;
                let callable = self.pop()?;
                match &callable.obj {
                    Obj::Global(m, n)
                        if m == "collections" && (n == "OrderedDict" || n == "defaultdict") =>
                    {
                        self.leaf(Obj::Dict(Vec::new()))?
                    }
                    _ => self.compose(&[&callable, &args], || {
                        Obj::Reduce(Box::new(callable.obj.clone()), Box::new(args.obj.clone()))
                    })?,
                }
            }
            b'b' => {
                let state = self.pop()?;
                let target = self.pop()?;
                match (target.obj, state.obj) {
                    (Obj::Dict(mut d), Obj::Dict(s)) => {
                        d.extend(s);
                        self.push(Item {
                            obj: Obj::Dict(d),
                            size: target.size.saturating_add(state.size),
                            depth: target.depth.max(state.depth),
                        })?;
                    }
                    (t, s) => {
                        let (ti, si) = (Item { obj: t, ..target }, Item { obj: s, ..state });
                        self.compose(&[&ti, &si], || Obj::Build)?;
                    }
                }
            }
            b'a' => {
                let value = self.pop()?;
                self.extend_top(vec![value], false)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.extend_top(vec![key, value], true)?;
            }
            b'e' => {
                let items = self.pop_to_mark()?;
                self.extend_top(items, false)?;
            }
            b'u' => {
                let items = self.pop_to_mark()?;
                self.extend_top(items, true)?;
            }
            b'h' | b'j' => {
                let key = self.memo_key(op == b'j')?;
                let size = self
                    .memo
                    .get(&key)
                    .map(|item| item.size)
                    .with_context(|| format!("memo entry {key} is used before it is set"))?;
                // The copy costs what the original did: counted before it is made.
                self.make(size)?;
                let copy = self.memo[&key].clone();
                self.stack.push(copy);
            }
            b'q' | b'r' => {
                let key = self.memo_key(op == b'r')?;
                let top = match self.stack.last() {
                    Some(top) if !matches!(top.obj, Obj::Mark) => top.size,
                    _ => bail!("BINPUT without an object"),
                };
                self.make(top)?;
                let copy = self.stack.last().expect("checked above").clone();
                self.memo.insert(key, copy);
            }
            b'.' => return Ok(Some(self.pop()?.obj)),
            other => bail!("opcode 0x{other:02x} is not supported"),
        }
        Ok(None)
    }
}

/// The tensors of a state dict (a dict of name → `_rebuild_tensor_v2`
/// call, possibly wrapped in `_rebuild_parameter`): entries that are not
/// tensors are skipped, as torch's loader would keep them as other objects.
fn collect_tensors(state: Obj, dir: &str, out: &mut HashMap<String, PthTensor>) -> Result<()> {
    let Obj::Dict(entries) = state else {
        bail!("the pickle does not hold a state dict");
    };
    for (key, value) in entries {
        let Obj::Str(name) = key else { continue };
        if let Some(tensor) = tensor(&value, dir).with_context(|| format!("tensor {name}"))? {
            out.insert(name, tensor);
        }
    }
    Ok(())
}

/// What an object is, in a word (messages never dump a whole object).
fn kind(obj: Option<&Obj>) -> &'static str {
    match obj {
        None => "missing",
        Some(Obj::Mark) => "a mark",
        Some(Obj::None) => "None",
        Some(Obj::Bool) => "a bool",
        Some(Obj::Int(_)) => "an integer",
        Some(Obj::Float) => "a float",
        Some(Obj::Str(_)) => "a string",
        Some(Obj::Global(..)) => "a class",
        Some(Obj::Tuple(_)) => "a tuple",
        Some(Obj::List(_)) => "a list",
        Some(Obj::Dict(_)) => "a dict",
        Some(Obj::Reduce(..)) => "a call",
        Some(Obj::Build) => "a BUILD",
        Some(Obj::Persistent(_)) => "a persistent id",
    }
}

fn global(obj: &Obj) -> Option<(&str, &str)> {
    match obj {
        Obj::Global(m, n) => Some((m, n)),
        _ => None,
    }
}

fn int(obj: Option<&Obj>, what: &str) -> Result<usize> {
    match obj {
        Some(Obj::Int(v)) if *v >= 0 => Ok(*v as usize),
        Some(Obj::Int(v)) => bail!("its {what} is {v}, not a non-negative integer"),
        other => bail!("its {what} is {}, not a non-negative integer", kind(other)),
    }
}

fn ints(obj: Option<&Obj>, what: &str) -> Result<Vec<usize>> {
    match obj {
        Some(Obj::Tuple(items)) if items.len() <= 8 => {
            items.iter().map(|i| int(Some(i), what)).collect()
        }
        other => bail!(
            "its {what} is {}, not a tuple of at most 8 integers",
            kind(other)
        ),
    }
}

fn tensor(value: &Obj, dir: &str) -> Result<Option<PthTensor>> {
    let Obj::Reduce(callable, args) = value else {
        return Ok(None);
    };
    let args = match (global(callable), &**args) {
        (Some(("torch._utils", "_rebuild_tensor_v2")), Obj::Tuple(a)) => a,
        // _rebuild_parameter(data, requires_grad, hooks): the data is the tensor.
        (Some(("torch._utils", "_rebuild_parameter")), Obj::Tuple(a)) => {
            return match a.first() {
                Some(inner) => tensor(inner, dir),
                None => bail!("_rebuild_parameter without arguments"),
            };
        }
        // _rebuild_from_type_v2(func, type, args, state)
        (Some(("torch._tensor", "_rebuild_from_type_v2")), Obj::Tuple(a)) => {
            return match (a.first(), a.get(2)) {
                (Some(func), Some(inner)) => tensor(
                    &Obj::Reduce(Box::new(func.clone()), Box::new(inner.clone())),
                    dir,
                ),
                _ => bail!("_rebuild_from_type_v2 with too few arguments"),
            };
        }
        _ => return Ok(None),
    };
    // (storage, storage_offset, size, stride, requires_grad, hooks)
    let storage = match args.first() {
        Some(Obj::Persistent(id)) => match &**id {
            Obj::Tuple(s) => s,
            other => bail!("its storage is {}, not a tuple", kind(Some(other))),
        },
        other => bail!("its storage is {}, not a persistent id", kind(other)),
    };
    // ("storage", storage class, key, location, numel)
    let class = storage.get(1).and_then(global).map(|(_, n)| n);
    let dtype = match class {
        Some("FloatStorage") => DType::F32,
        Some("HalfStorage") => DType::F16,
        Some("BFloat16Storage") => DType::BF16,
        Some("DoubleStorage") => DType::F64,
        other => bail!(
            "storage type {} is not supported (float, half, bfloat16, double)",
            super::shown(other.unwrap_or("missing"))
        ),
    };
    let key = match storage.get(2) {
        Some(Obj::Str(k)) if !k.is_empty() && !k.contains(['/', '\\']) => k,
        other => bail!("its storage key is {}, not a file name", kind(other)),
    };
    let offset = int(args.get(1), "storage offset")?;
    let shape = ints(args.get(2), "size")?;
    let stride = ints(args.get(3), "stride")?;
    ensure!(
        shape.len() == stride.len(),
        "its size {shape:?} and stride {stride:?} differ in length"
    );
    // Row-major strides: anything else would need a gather starling does not do.
    let mut expect = 1usize;
    for (d, s) in shape.iter().zip(&stride).rev() {
        ensure!(
            *d <= 1 || *s == expect,
            "it is not stored contiguously (size {shape:?}, stride {stride:?})"
        );
        expect = expect.saturating_mul(*d);
    }
    Ok(Some(PthTensor {
        dtype,
        shape,
        offset,
        entry: format!("{dir}/data/{key}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memo bomb of the issue: each round doubles the object it copies.
    pub fn memo_bomb(rounds: usize) -> Vec<u8> {
        let mut p = vec![0x80, 2, b')', b'q', 0];
        for _ in 0..rounds {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        p
    }

    #[test]
    fn a_memo_bomb_is_refused_quickly() {
        let start = std::time::Instant::now();
        let err = unpickle(&memo_bomb(40)).unwrap_err();
        assert!(format!("{err:#}").contains("pickle bomb"), "{err:#}");
        assert!(start.elapsed().as_secs_f64() < 1.0);
        // A few rounds are only a small object.
        unpickle(&memo_bomb(5)).unwrap();
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85, 2_000_000));
        p.push(b'.');
        let err = format!("{:#}", unpickle(&p).unwrap_err());
        assert!(err.contains("nest deeper"), "{err}");
        // Nesting through APPEND: each new list holds a copy of the last.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..300 {
            p.extend([b']', b'h', 0, b'a', b'q', 0]);
        }
        p.push(b'.');
        let err = format!("{:#}", unpickle(&p).unwrap_err());
        assert!(err.contains("nest deeper"), "{err}");
    }

    #[test]
    fn lengths_and_malformed_opcodes_are_refused() {
        for (bytes, needle) in [
            (&[0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff][..], "ends inside"),
            (&[b'h', 7, b'.'][..], "memo entry 7"),
            (&[b'a', b'.'][..], "stack is empty"),
            (&[b'(', b'a', b'.'][..], "mark"),
            (&[b'K', 1, b'K', 2, b'K', 3, b't', b'.'][..], "mark"),
            (&[b'K', 1, b'K', 2, b'a', b'.'][..], "not a list"),
            (&[0x8a, 9][..], "LONG1"),
            (&[0xff][..], "not supported"),
            (&[b'c', b'x'][..], "end of line"),
        ] {
            let err = format!("{:#}", unpickle(bytes).unwrap_err());
            assert!(err.contains(needle), "{bytes:?}: {err}");
        }
    }

    #[test]
    fn short_rebuild_arguments_are_an_error_not_a_panic() {
        // _rebuild_tensor_v2() with an empty argument tuple, in a state dict:
        // candle's reader indexed it with Vec::remove and panicked.
        let mut p = vec![0x80, 2, b'}', b'X'];
        p.extend(1u32.to_le_bytes());
        p.push(b'w');
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n)R");
        p.extend(b"s.");
        let state = unpickle(&p).unwrap();
        let mut out = HashMap::new();
        let err = format!(
            "{:#}",
            collect_tensors(state, "archive", &mut out).unwrap_err()
        );
        assert!(err.contains("tensor w") && err.contains("storage"), "{err}");
    }

    #[test]
    fn long1_is_twos_complement() {
        assert!(matches!(
            unpickle(&[0x8a, 1, 0xff, b'.']).unwrap(),
            Obj::Int(-1)
        ));
        assert!(matches!(
            unpickle(&[0x8a, 2, 0x00, 0x01, b'.']).unwrap(),
            Obj::Int(256)
        ));
    }
}
