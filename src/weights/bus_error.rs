//! A model file truncated or rewritten while its pages are mapped: a clear
//! one-line error and exit status 1, not a crash.
//!
//! Loading is zero-copy (the kernels read the file's memory map), so if
//! someone truncates the file, or a tool rewrites it in place, while a model
//! runs, the next read of a page that no longer exists in the file raises
//! `SIGBUS` (`BUS_ADRERR`), which by default kills the process with "Bus
//! error (core dumped)" and no hint of why. llama.cpp, candle and the
//! safetensors crate all map files and die the same way. Here a handler
//! recognises a fault inside a registered map, names the file, and exits
//! with status 1; a fault anywhere else goes to the handler that was there
//! before (Rust's runtime, or the default action), exactly as if this module
//! did not exist. The background move (`resident`) shortens the window: once
//! a chunk sits in anonymous memory, the file no longer matters to it.
//!
//! Why not a crate: `signal-hook-registry` (in the tree through tokio)
//! runs a handler with the fault's `siginfo_t`, but chains to the action
//! that was there before only when that was a function: with the default
//! action before it, a fault it does not claim returns and re-runs its
//! instruction forever. A synchronous fault needs the previous action put
//! back, which `on_bus_error` does.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// Maps watched at once (each model file mapped is one; a sharded
/// checkpoint maps one per shard). A map past this many is not watched: a
/// fault in it takes the default path.
const SLOTS: usize = 128;

/// Slot `i` watches `[START[i], END[i])`, and a fault there prints the
/// `LINE_LEN[i]` bytes at `LINE[i]`; `START[i] == 0` is a free slot.
static START: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static END: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LINE: [AtomicPtr<u8>; SLOTS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];
static LINE_LEN: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

/// The error a fault in a map of `path` ends the process with.
fn message(path: &std::path::Path) -> String {
    format!(
        "error: {}: the model file was truncated or rewritten on disk while starling was \
         reading it from memory (bus error on its mapped pages); leave a model's files \
         unchanged while it runs\n",
        path.display()
    )
}

/// Watches `map` (a read-only mapping of `path`) until dropped.
pub struct Watch {
    slot: Option<usize>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            END[slot].store(0, Ordering::SeqCst);
            START[slot].store(0, Ordering::SeqCst);
        }
    }
}

/// Watches the mapped bytes `map` of the file `path`: a bus error reading
/// them ends the process with a one-line error naming `path` and exit
/// status 1. Installs the handler on first use. Does nothing off Linux, or
/// when every slot is taken.
pub fn watch(map: &[u8], path: &std::path::Path) -> Watch {
    #[cfg(target_os = "linux")]
    {
        install();
        let start = map.as_ptr() as usize;
        if map.is_empty() || start == 0 {
            return Watch { slot: None };
        }
        // Made whole now (the handler may not allocate, and one `write` of
        // it keeps the line in one piece) and leaked on purpose: the
        // handler may read it at any moment, even while the watch is being
        // dropped; one line per file loaded.
        let line: &'static [u8] = Box::leak(message(path).into_bytes().into_boxed_slice());
        for slot in 0..SLOTS {
            if START[slot]
                .compare_exchange(0, usize::MAX, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                // Claimed (START = MAX matches no address until it is set).
                LINE[slot].store(line.as_ptr().cast_mut(), Ordering::SeqCst);
                LINE_LEN[slot].store(line.len(), Ordering::SeqCst);
                END[slot].store(start + map.len(), Ordering::SeqCst);
                START[slot].store(start, Ordering::SeqCst);
                return Watch { slot: Some(slot) };
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (map, path);
    Watch { slot: None }
}

/// The slot whose range holds `addr`.
fn slot_of(addr: usize) -> Option<usize> {
    (0..SLOTS).find(|&i| {
        let start = START[i].load(Ordering::SeqCst);
        start != 0 && start <= addr && addr < END[i].load(Ordering::SeqCst)
    })
}

#[cfg(target_os = "linux")]
mod handler {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set by the first thread that claims a fault.
    static ENDING: AtomicBool = AtomicBool::new(false);

    /// The action `SIGBUS` had before ours: faults outside the watched maps
    /// go back to it.
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

    pub(super) fn install() {
        PREVIOUS.get_or_init(|| {
            // SAFETY: plain `sigaction` calls on zeroed structs; the handler
            // is async-signal-safe (atomics, `write`, `_exit`, `sigaction`,
            // `raise`).
            unsafe {
                let mut previous: libc::sigaction = std::mem::zeroed();
                let mut ours: libc::sigaction = std::mem::zeroed();
                ours.sa_sigaction = on_bus_error as *const () as usize;
                ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut ours.sa_mask);
                libc::sigaction(libc::SIGBUS, &ours, &mut previous);
                previous
            }
        });
    }

    extern "C" fn on_bus_error(
        signal: libc::c_int,
        info: *mut libc::siginfo_t,
        _context: *mut libc::c_void,
    ) {
        // SAFETY: the kernel hands a valid `siginfo_t`; only
        // async-signal-safe calls follow.
        unsafe {
            let faulted = (*info).si_code > 0;
            if faulted && let Some(slot) = super::slot_of((*info).si_addr() as usize) {
                // Every thread reading the weights faults at about the same
                // moment: the first one says it and ends the process; the
                // others wait for that (two writes interleaved the line).
                if ENDING.swap(true, Ordering::SeqCst) {
                    loop {
                        libc::pause();
                    }
                }
                let line = super::LINE[slot].load(Ordering::SeqCst);
                let len = super::LINE_LEN[slot].load(Ordering::SeqCst);
                libc::write(2, line.cast_const().cast(), len);
                libc::_exit(1);
            }
            // Not a watched map: the previous action takes it. A fault
            // re-runs its instruction and faults again into that action; a
            // `SIGBUS` sent by someone is raised again.
            if let Some(previous) = PREVIOUS.get() {
                libc::sigaction(signal, previous, std::ptr::null_mut());
            } else {
                libc::signal(signal, libc::SIG_DFL);
            }
            if !faulted {
                libc::raise(signal);
            }
        }
    }
}

#[cfg(target_os = "linux")]
use handler::install;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_covers_its_range_until_dropped() {
        let bytes = vec![7u8; 4096];
        let watch = watch(&bytes, std::path::Path::new("/models/x.gguf"));
        let start = bytes.as_ptr() as usize;
        if cfg!(target_os = "linux") {
            let slot = slot_of(start + 100).expect("watched");
            assert_eq!(slot_of(start + 4095), Some(slot));
            assert_eq!(slot_of(start + 4096), None, "one past the end");
            assert_eq!(slot_of(start - 1), None);
        }
        drop(watch);
        assert_eq!(slot_of(start + 100), None, "dropped");
    }

    /// Threads reading a truncated map at the same moment all fault: the
    /// process still ends with the line written once, whole (three writes
    /// from every thread once interleaved it). The faults run in a child
    /// process: this test binary again, running only this test.
    #[test]
    #[cfg(target_os = "linux")]
    fn threads_faulting_together_write_the_line_once() {
        const CHILD: &str = "STARLING_BUS_ERROR_CHILD";
        const THREADS: usize = 4;
        if std::env::var_os(CHILD).is_some() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model.gguf");
            std::fs::write(&path, vec![1u8; THREADS << 16]).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: the map is read only by the threads below, which
            // fault on purpose: the handler ends the process.
            let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
            let _watch = watch(&map, &path);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(0)
                .unwrap();
            let barrier = std::sync::Barrier::new(THREADS);
            let (barrier, map) = (&barrier, &map);
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    s.spawn(move || {
                        barrier.wait();
                        // SAFETY: in bounds of the map (it faults: the file is gone).
                        unsafe { std::ptr::read_volatile(&map[t << 16]) }
                    });
                }
            });
            unreachable!("every read faults");
        }
        let name = "weights::bus_error::tests::threads_faulting_together_write_the_line_once";
        for _ in 0..3 {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--nocapture", "--test-threads", "1"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(
                stderr.starts_with("error: /")
                    && stderr.contains("/model.gguf: the model file was truncated")
                    && stderr.matches("error: ").count() == 1
                    && stderr.matches('\n').count() == 1,
                "{stderr}"
            );
        }
    }

    #[test]
    fn the_line_names_the_file_and_ends_in_one_newline() {
        let line = message(std::path::Path::new("models/x y.gguf"));
        assert!(line.starts_with("error: models/x y.gguf: the model file was truncated"));
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with("while it runs\n"), "{line}");
    }
}
