//! Bounds what candle's pickle reader may do with a PyTorch `.bin` before
//! it is given the file.
//!
//! A `.bin` is a zip whose `*/data.pkl` pickles the state dict (each tensor
//! a `_rebuild_tensor_v2` call naming a storage entry `*/data/<key>`).
//! candle 0.11.1's `pickle::Stack` builds plain values: every `BINPUT` and
//! `BINGET` deep-copies a memo entry, so a 300-byte pickle of repeated
//! `BINGET 0, BINGET 0, TUPLE2, BINPUT 0` doubles an object 40 times (past
//! 7 GB in 20 s); nested objects are dropped recursively, so two million
//! `TUPLE1`s overflow the stack and abort; and `BINUNICODE` allocates its
//! length before reading it. Its memory and recursion cannot be limited
//! from outside, so each `data.pkl` is first *simulated* here: the same
//! opcodes, with every object replaced by two numbers, the objects candle
//! would allocate for it and its nesting depth. That model is exact for
//! candle's copy-everything semantics, so a pickle that passes cannot make
//! candle allocate more than [`max_objects`] objects or nest deeper than
//! [`MAX_DEPTH`]. Honest checkpoints stay far below both (about a tenth of
//! an object per pickle byte, depth 5).
//!
//! Opcodes: those candle implements (protocol 2, what `torch.save` writes);
//! anything else is refused here as candle would refuse it.

use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Deeper objects are refused (candle recurses once per level).
pub const MAX_DEPTH: u32 = 256;
/// The largest `data.pkl` read (a 70B model's is a few hundred KB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// The objects candle may build for a pickle of `len` bytes, counting each
/// string's bytes as objects too: a small multiple of the pickle's size.
pub fn max_objects(len: usize) -> u64 {
    (1 << 20) + 16 * len as u64
}

/// One simulated object: what candle would allocate for it, and how deep
/// it nests. A mark is `None`.
type Item = Option<(u64, u32)>;

/// The sizes the zip's directory gives for each entry: (uncompressed,
/// compressed) bytes, to check tensor data against before reading it.
pub type EntrySizes = HashMap<String, (u64, u64)>;

/// Checks every `data.pkl` in the zip at `path`; returns the entries' sizes.
pub fn check_file(path: &Path) -> Result<EntrySizes> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| anyhow::anyhow!("not a zip archive: {e}"))?;
    let mut sizes = EntrySizes::new();
    let mut pickles = Vec::new();
    for i in 0..zip.len() {
        let entry = zip
            .by_index_raw(i)
            .map_err(|e| anyhow::anyhow!("zip entry {i}: {e}"))?;
        let name = entry
            .name()
            .map_err(|e| anyhow::anyhow!("zip entry {i}: {e}"))?
            .into_owned();
        sizes.insert(name.clone(), (entry.size(), entry.compressed_size()));
        if name.ends_with("data.pkl") {
            pickles.push(i);
        }
    }
    ensure!(!pickles.is_empty(), "the archive holds no data.pkl");
    for i in pickles {
        let entry = zip
            .by_index(i)
            .map_err(|e| anyhow::anyhow!("zip entry {i}: {e}"))?;
        let name = entry
            .name()
            .map_err(|e| anyhow::anyhow!("zip entry {i}: {e}"))?
            .into_owned();
        let mut bytes = Vec::new();
        entry
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {name}"))?;
        ensure!(
            bytes.len() as u64 <= MAX_PICKLE_BYTES,
            "{name} is larger than {MAX_PICKLE_BYTES} bytes"
        );
        check_pickle(&bytes).with_context(|| name.clone())?;
    }
    Ok(sizes)
}

/// Simulates candle's reader over one pickle; errors name the opcode's offset.
pub fn check_pickle(pickle: &[u8]) -> Result<()> {
    let mut sim = Simulation {
        input: pickle,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        made: 0,
        limit: max_objects(pickle.len()),
    };
    loop {
        let at = sim.pos;
        let done = sim.step().with_context(|| format!("at byte {at}"))?;
        if done {
            return Ok(());
        }
    }
}

struct Simulation<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, (u64, u32)>,
    /// Objects candle would have allocated so far (copies included).
    made: u64,
    limit: u64,
}

impl Simulation<'_> {
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

    fn line(&mut self) -> Result<usize> {
        let rest = &self.input[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("a GLOBAL name has no end of line")?;
        self.pos += n + 1;
        Ok(n)
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

    fn push(&mut self, size: u64, depth: u32) -> Result<()> {
        ensure!(
            depth <= MAX_DEPTH,
            "objects nest deeper than {MAX_DEPTH} levels"
        );
        self.make(1)?;
        self.stack.push(Some((size, depth)));
        Ok(())
    }

    fn leaf(&mut self) -> Result<()> {
        self.push(1, 1)
    }

    fn pop(&mut self) -> Result<(u64, u32)> {
        match self.stack.pop() {
            Some(Some(item)) => Ok(item),
            Some(None) => bail!("an opcode takes a mark as its argument"),
            None => bail!("the stack is empty"),
        }
    }

    /// Everything above the topmost mark, which is removed.
    fn pop_to_mark(&mut self) -> Result<(u64, u32, usize)> {
        let mark = self
            .stack
            .iter()
            .rposition(Option::is_none)
            .context("no mark on the stack")?;
        let items: Vec<Item> = self.stack.drain(mark..).skip(1).collect();
        let (size, depth) = combine(items.iter().flatten().copied());
        Ok((size, depth, items.len()))
    }

    /// A new container of `items`.
    fn container(&mut self, items: impl IntoIterator<Item = (u64, u32)>) -> Result<()> {
        let (size, depth) = combine(items);
        self.push(size + 1, depth + 1)
    }

    /// Adds objects to the container on top of the stack (APPEND, SETITEM...).
    fn extend_top(&mut self, size: u64, depth: u32) -> Result<()> {
        match self.stack.last_mut() {
            Some(Some((top_size, top_depth))) => {
                *top_size += size;
                *top_depth = (*top_depth).max(depth + 1);
                ensure!(
                    *top_depth <= MAX_DEPTH,
                    "objects nest deeper than {MAX_DEPTH} levels"
                );
                Ok(())
            }
            _ => bail!("nothing to add to"),
        }
    }

    fn step(&mut self) -> Result<bool> {
        let op = self.u8()?;
        match op {
            0x80 => {
                self.u8()?; // PROTO
            }
            b'c' => {
                // GLOBAL module\nname\n: a class with two strings.
                let n = self.line()? + self.line()?;
                self.make(n as u64)?;
                self.leaf()?;
            }
            b'K' => {
                self.take(1)?;
                self.leaf()?;
            }
            b'M' => {
                self.take(2)?;
                self.leaf()?;
            }
            b'J' => {
                self.take(4)?;
                self.leaf()?;
            }
            b'G' => {
                self.take(8)?;
                self.leaf()?;
            }
            0x8a => {
                // LONG1: candle reads at most 8 bytes into an i64.
                let n = self.u8()?;
                ensure!(n <= 8, "a LONG1 of {n} bytes does not fit an i64");
                self.take(n as usize)?;
                self.leaf()?;
            }
            b'X' => {
                let len = self.u32()? as usize;
                let bytes = self.take(len)?;
                ensure!(
                    std::str::from_utf8(bytes).is_ok(),
                    "a BINUNICODE string is not UTF-8"
                );
                self.make(len as u64)?;
                self.push(1 + len as u64, 1)?;
            }
            // candle 0.11.1 reads DICT (`d`) as EMPTY_DICT: modelled as it behaves.
            0x88 | 0x89 | b'N' | b')' | b']' | b'}' | b'd' => self.leaf()?,
            b'(' => {
                self.make(1)?;
                self.stack.push(None);
            }
            b'Q' => {
                // BINPERSID wraps the id.
                let id = self.pop()?;
                self.container([id])?;
            }
            0x85 => {
                let a = self.pop()?;
                self.container([a])?;
            }
            0x86 => {
                let b = self.pop()?;
                let a = self.pop()?;
                self.container([a, b])?;
            }
            0x87 => {
                let c = self.pop()?;
                let b = self.pop()?;
                let a = self.pop()?;
                self.container([a, b, c])?;
            }
            b't' => {
                let (size, depth, _) = self.pop_to_mark()?;
                self.push(size + 1, depth + 1)?;
            }
            b'R' | b'b' | 0x81 => {
                // REDUCE, BUILD, NEWOBJ: callable and arguments in one object.
                let args = self.pop()?;
                let callable = self.pop()?;
                self.container([callable, args])?;
            }
            b'a' | b's' => {
                let value = self.pop()?;
                let (size, depth) = if op == b's' {
                    combine([self.pop()?, value])
                } else {
                    value
                };
                self.extend_top(size, depth)?;
            }
            b'e' | b'u' => {
                let (size, depth, n) = self.pop_to_mark()?;
                ensure!(
                    op == b'e' || n % 2 == 0,
                    "SETITEMS of an odd number of items"
                );
                self.extend_top(size, depth)?;
            }
            b'h' | b'j' => {
                let key = if op == b'h' {
                    u32::from(self.u8()?)
                } else {
                    self.u32()?
                };
                let (size, depth) = *self
                    .memo
                    .get(&key)
                    .with_context(|| format!("memo entry {key} is used before it is set"))?;
                // candle copies the whole entry.
                self.make(size)?;
                self.stack.push(Some((size, depth)));
            }
            b'q' | b'r' => {
                let key = if op == b'q' {
                    u32::from(self.u8()?)
                } else {
                    self.u32()?
                };
                let top = match self.stack.last() {
                    Some(Some(top)) => *top,
                    _ => bail!("BINPUT without an object"),
                };
                self.make(top.0)?;
                self.memo.insert(key, top);
            }
            b'.' => return Ok(true),
            other => bail!("opcode 0x{other:02x} is not supported"),
        }
        Ok(false)
    }
}

/// The total size and the greatest depth of some objects.
fn combine(items: impl IntoIterator<Item = (u64, u32)>) -> (u64, u32) {
    items.into_iter().fold((0, 0), |(size, depth), (s, d)| {
        (size.saturating_add(s), depth.max(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memo bomb of the issue: each round doubles the object candle holds.
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
        let err = check_pickle(&memo_bomb(40)).unwrap_err();
        assert!(format!("{err:#}").contains("pickle bomb"), "{err:#}");
        assert!(start.elapsed().as_secs_f64() < 1.0);
        // A few rounds are only a small object.
        check_pickle(&memo_bomb(5)).unwrap();
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85, 2_000_000));
        p.push(b'.');
        let err = format!("{:#}", check_pickle(&p).unwrap_err());
        assert!(err.contains("nest deeper"), "{err}");
        // Nesting through APPEND: each new list holds a copy of the last.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..300 {
            p.extend([b']', b'h', 0, b'a', b'q', 0]);
        }
        p.push(b'.');
        let err = format!("{:#}", check_pickle(&p).unwrap_err());
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
            (&[0x8a, 9][..], "LONG1"),
            (&[0xff][..], "not supported"),
            (&[b'c', b'x'][..], "end of line"),
        ] {
            let err = format!("{:#}", check_pickle(bytes).unwrap_err());
            assert!(err.contains(needle), "{bytes:?}: {err}");
        }
    }
}
