//! Hub downloads against a stand-in for the hub on 127.0.0.1 (nothing leaves
//! this machine): first download then run, a cache hit with the server gone,
//! offline mode with and without the cache, 404, 401, a connection dropped
//! mid-file then a good rerun, and `list` / `rm` on a temporary HF_HOME.

mod common;

use common::golden;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

const REPO: &str = "test-org/tiny-starling";
/// A gated repo: the same files, served only to `Authorization: Bearer TOKEN`.
const GATED: &str = "test-org/gated";
const TOKEN: &str = "hf_test_token";
/// A repo with a config and a tokenizer but no weights.
const NO_WEIGHTS: &str = "test-org/no-weights";
/// The declare-lab/starling-7B shape: sharded .bin weights, tokenizer.model only.
const BIN_REPO: &str = "test-org/tiny-declare";
/// A repo of GGUF files only (no config.json), as llama.cpp users publish them.
const GGUF_REPO: &str = "test-org/tiny-gguf";
/// Starling-RM-7B-alpha's layout: config and one .bin, no tokenizer.
const RM_REPO: &str = "berkeley-nest/Starling-RM-7B-alpha";
/// The tokenizer its card names: gated, with weights that must not be fetched.
const LLAMA_REPO: &str = "meta-llama/Llama-2-7b-chat-hf";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Files of the served repos, by repo and name.
fn repo_files(repo: &str) -> Option<&'static HashMap<String, Vec<u8>>> {
    static SAFETENSORS: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    static BIN: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    static BARE: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    static GGUF: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    static RM: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    static LLAMA: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    let read = |dir: &Path, names: &[&str]| -> HashMap<String, Vec<u8>> {
        names
            .iter()
            .map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap()))
            .collect()
    };
    match repo {
        REPO | GATED => Some(SAFETENSORS.get_or_init(|| {
            read(
                &common::tiny_model(),
                &[
                    "config.json",
                    "model.safetensors",
                    "tokenizer.model",
                    "tokenizer_config.json",
                ],
            )
        })),
        BIN_REPO => Some(BIN.get_or_init(|| {
            let dir = common::scratch("hub-bin-source");
            common::write_pytorch_twin(&dir);
            read(
                &dir,
                &[
                    "config.json",
                    "pytorch_model-00001-of-00002.bin",
                    "pytorch_model-00002-of-00002.bin",
                    "pytorch_model.bin.index.json",
                    "tokenizer.model",
                    "tokenizer_config.json",
                ],
            )
        })),
        GGUF_REPO => Some(GGUF.get_or_init(|| {
            let dir = common::scratch("hub-gguf-source");
            let model = common::tiny_model().display().to_string();
            for (name, kind) in [("tiny.Q8_0.gguf", "q8_0"), ("tiny.F32.gguf", "f32")] {
                let out = dir.join(name).display().to_string();
                common::ok(&common::starling(
                    &["quantize", &model, &out, "--type", kind],
                    None,
                ));
            }
            let mut files = read(&dir, &["tiny.Q8_0.gguf", "tiny.F32.gguf"]);
            files.insert("README.md".into(), b"GGUF files of a tiny model".to_vec());
            files
        })),
        RM_REPO => Some(RM.get_or_init(|| {
            let dir = common::scratch("hub-rm-source");
            common::write_reward_model(
                &dir,
                "rm-7b-shape",
                &["model.model", "transformer"],
                common::Format::Pickle,
            );
            read(&dir, &["config.json", "pytorch_model.bin"])
        })),
        LLAMA_REPO => Some(LLAMA.get_or_init(|| {
            let dir = common::scratch("hub-llama-source");
            common::write_tokenizer(&dir, &[]);
            let mut files = read(&dir, &["tokenizer.json", "tokenizer_config.json"]);
            files.insert("config.json".into(), b"{}".to_vec());
            files.insert("model.safetensors".into(), vec![0; 4096]);
            files
        })),
        NO_WEIGHTS => Some(
            BARE.get_or_init(|| read(&common::tiny_model(), &["config.json", "tokenizer.model"])),
        ),
        _ => None,
    }
}

struct Hub {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Drop the connection half-way through the next N full GETs of model.safetensors.
    drops: Arc<AtomicUsize>,
    /// While set, downloads of model.safetensors wait (a slow hub).
    hold: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Hub {
    fn start() -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let drops = Arc::new(AtomicUsize::new(0));
        let hold = Arc::new(AtomicBool::new(false));
        let (s, d, h) = (stop.clone(), drops.clone(), hold.clone());
        let handle = std::thread::spawn(move || {
            // Bounded: the server ends when told, or after two minutes.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !s.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        // Never let a test hang on a silent client.
                        stream
                            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                            .unwrap();
                        let _ = serve(stream, &d, &h);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Hub {
            port,
            stop,
            drops,
            hold,
            handle: Some(handle),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn serve(mut stream: TcpStream, drops: &AtomicUsize, hold: &AtomicBool) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    let mut authorized = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().strip_prefix("bytes=").map(str::to_string);
            } else if k.eq_ignore_ascii_case("authorization") {
                authorized = v.trim() == format!("Bearer {TOKEN}");
            }
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let not_found = [("X-Error-Code", "RepoNotFound".to_string())];
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let repo = rest.split("/revision/").next().unwrap_or("");
        if (repo == GATED || repo == LLAMA_REPO) && !authorized {
            return respond(
                &mut stream,
                "401 Unauthorized",
                &[("X-Error-Code", "GatedRepo".into())],
                b"{}",
            );
        }
        return match repo_files(repo) {
            Some(files) => {
                let siblings: Vec<_> = files
                    .keys()
                    .map(|n| serde_json::json!({"rfilename": n}))
                    .collect();
                let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
                respond(
                    &mut stream,
                    "200 OK",
                    &[("Content-Type", "application/json".into())],
                    body.as_bytes(),
                )
            }
            None => respond(&mut stream, "404 Not Found", &not_found, b"{}"),
        };
    }
    // /{owner}/{name}/resolve/{revision}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let (repo, file) = match parts.as_slice() {
        [owner, name, "resolve", _rev, file] => (format!("{owner}/{name}"), file.to_string()),
        _ => return respond(&mut stream, "404 Not Found", &not_found, b""),
    };
    if (repo == GATED || repo == LLAMA_REPO) && !authorized {
        return respond(
            &mut stream,
            "401 Unauthorized",
            &[("X-Error-Code", "GatedRepo".into())],
            b"",
        );
    }
    let Some(data) = repo_files(&repo).and_then(|files| files.get(&file)) else {
        return respond(
            &mut stream,
            "404 Not Found",
            &[("X-Error-Code", "EntryNotFound".into())],
            b"",
        );
    };
    let etag = format!("\"{:x}\"", Sha256::digest(data));
    let start: usize = range
        .as_deref()
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end = match range
        .as_deref()
        .and_then(|r| r.split('-').nth(1))
        .filter(|e| !e.is_empty())
    {
        Some(e) => e.parse::<usize>().unwrap() + 1,
        None => data.len(),
    };
    let body = &data[start.min(data.len())..end.min(data.len())];
    let headers = vec![
        ("ETag", etag),
        ("X-Repo-Commit", COMMIT.to_string()),
        ("Accept-Ranges", "bytes".to_string()),
        ("Content-Length", body.len().to_string()),
        (
            "Content-Range",
            format!("bytes {start}-{}/{}", end - 1, data.len()),
        ),
    ];
    let status = if range.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let is_probe = range.as_deref() == Some("0-0");
    if file == "model.safetensors" && !is_probe {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while hold.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    if file == "model.safetensors" && !is_probe && drops.load(Ordering::SeqCst) > 0 {
        drops.fetch_sub(1, Ordering::SeqCst);
        // Promise the whole body, send half, hang up.
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body[..body.len() / 2])?;
        stream.flush()?;
        return stream.shutdown(std::net::Shutdown::Both);
    }
    respond(&mut stream, status, &headers, body)
}

fn starling(home: &Path, endpoint: Option<&str>, envs: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_starling"));
    cmd.args(args)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", endpoint.unwrap_or("http://127.0.0.1:9"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn answer(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure with {needle:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
}

const RUN: [&str; 7] = ["run", "--model", REPO, "--temperature", "0", "-n", "24"];

fn run_args() -> Vec<&'static str> {
    let mut v = RUN.to_vec();
    v.push("Hello");
    v
}

fn golden_answer() -> String {
    format!(
        "{}\n",
        golden()["cases"][0]["greedy"]["text"].as_str().unwrap()
    )
}

fn snapshot(home: &Path) -> PathBuf {
    home.join("hub/models--test-org--tiny-starling/snapshots")
        .join(COMMIT)
}

#[test]
fn download_then_cache_hit_offline_and_without_a_server() {
    let home = common::scratch("hub-home");
    let mut hub = Hub::start();
    let endpoint = hub.endpoint();
    assert_eq!(
        answer(&starling(&home, Some(&endpoint), &[], &run_args())),
        golden_answer()
    );
    for name in repo_files(REPO).unwrap().keys() {
        let cached = std::fs::read(snapshot(&home).join(name)).unwrap();
        assert_eq!(
            &cached,
            &repo_files(REPO).unwrap()[name],
            "{name} differs from the served file"
        );
    }
    hub.stop();
    // The server is gone: the cache alone answers, online or offline.
    assert_eq!(
        answer(&starling(&home, Some(&endpoint), &[], &run_args())),
        golden_answer()
    );
    assert_eq!(
        answer(&starling(
            &home,
            Some(&endpoint),
            &[("HF_HUB_OFFLINE", "1")],
            &run_args()
        )),
        golden_answer()
    );
    let mut offline = run_args();
    offline.insert(1, "--offline");
    assert_eq!(
        answer(&starling(&home, None, &[], &offline)),
        golden_answer()
    );

    // list shows it with its size; rm needs --yes without a terminal, then removes it.
    let listed = answer(&starling(&home, None, &[], &["list"]));
    assert!(
        listed.contains("starling-lm-7b-beta") && listed.contains(REPO),
        "{listed}"
    );
    let size: u64 = repo_files(REPO)
        .unwrap()
        .values()
        .map(|v| v.len() as u64)
        .sum();
    assert!(
        listed.contains(&format!("{:.1} MB", size as f64 / 1e6)),
        "{listed}"
    );
    fails_with(&starling(&home, None, &[], &["rm", REPO]), "--yes");
    answer(&starling(&home, None, &[], &["rm", REPO, "--yes"]));
    assert!(!home.join("hub/models--test-org--tiny-starling").exists());
    fails_with(
        &starling(&home, None, &[], &["rm", REPO, "--yes"]),
        "not in the cache",
    );
}

#[test]
fn offline_without_the_cache_says_what_is_missing() {
    let home = common::scratch("hub-empty");
    fails_with(
        &starling(&home, None, &[("HF_HUB_OFFLINE", "1")], &run_args()),
        "offline",
    );
    fails_with(
        &starling(&home, None, &[], &run_args()),
        "cannot reach the hub",
    );
}

#[test]
fn missing_and_gated_repos() {
    let home = common::scratch("hub-errors");
    let hub = Hub::start();
    let endpoint = hub.endpoint();
    let out = starling(
        &home,
        Some(&endpoint),
        &[],
        &["run", "--model", "test-org/nothing-here", "Hello"],
    );
    fails_with(&out, "model test-org/nothing-here not found");
    let out = starling(
        &home,
        Some(&endpoint),
        &[],
        &["run", "--model", "test-org/gated", "Hello"],
    );
    fails_with(&out, "HF_TOKEN");
}

#[test]
fn a_dropped_connection_leaves_nothing_that_passes_for_complete() {
    let home = common::scratch("hub-drop");
    let hub = Hub::start();
    let endpoint = hub.endpoint();
    hub.drops.store(1, Ordering::SeqCst);
    let out = starling(&home, Some(&endpoint), &[], &run_args());
    assert!(!out.status.success(), "a truncated download must not run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("downloading model.safetensors"), "{stderr}");
    assert!(
        !snapshot(&home).join("model.safetensors").exists(),
        "half a file in the snapshot"
    );
    // The rerun resumes (or restarts) and answers exactly as an undisturbed download.
    assert_eq!(
        answer(&starling(&home, Some(&endpoint), &[], &run_args())),
        golden_answer()
    );
    let cached = std::fs::read(snapshot(&home).join("model.safetensors")).unwrap();
    assert_eq!(cached, repo_files(REPO).unwrap()["model.safetensors"]);
}

/// A hub that accepts connections and then sends nothing, before the file
/// list or in the middle of the weights, ends the command with one line
/// after the stall limit instead of hanging it.
#[test]
fn a_stalled_hub_ends_the_command_instead_of_hanging_it() {
    let stall = [("STARLING_HUB_STALL_S", "1")];
    let needle = "sent nothing for 1 s: the download stalled";
    // Silent from the first request: the repo's file list never comes.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let (stream, _) = silent.accept().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(5));
        drop(stream);
    });
    let home = common::scratch("hub-stall");
    let started = std::time::Instant::now();
    fails_with(
        &starling(&home, Some(&endpoint), &stall, &["pull", REPO]),
        needle,
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    held.join().unwrap();

    // Stalled in the middle: config and tokenizer came, the weights do not.
    let hub = Hub::start();
    hub.hold.store(true, Ordering::SeqCst);
    let out = starling(&home, Some(&hub.endpoint()), &stall, &run_args());
    hub.hold.store(false, Ordering::SeqCst);
    fails_with(&out, needle);
    assert!(!snapshot(&home).join("model.safetensors").exists());
    assert_eq!(
        answer(&starling(&home, Some(&hub.endpoint()), &[], &run_args())),
        golden_answer()
    );
}

#[test]
fn model_names_parse_as_directories_names_and_repos() {
    use starling::source::ModelSpec;
    let hub = |s: &str| match ModelSpec::parse(s).unwrap() {
        ModelSpec::Hub(m) => (m.repo, m.revision),
        other => panic!("{s}: {other:?}"),
    };
    assert_eq!(
        hub("starling-lm-7b-beta"),
        ("Nexusflow/Starling-LM-7B-beta".into(), "main".into())
    );
    assert_eq!(
        hub("starling-7b"),
        ("declare-lab/starling-7B".into(), "main".into())
    );
    assert_eq!(hub("owner/name@v1.0"), ("owner/name".into(), "v1.0".into()));
    assert!(matches!(
        ModelSpec::parse("/no/such/dir").unwrap(),
        ModelSpec::Local(_)
    ));
    assert!(matches!(
        ModelSpec::parse(common::tiny_model().to_str().unwrap()).unwrap(),
        ModelSpec::Local(_)
    ));
    assert!(ModelSpec::parse("justaword").is_err());
    match ModelSpec::parse("owner/name@v2:Q4_K_M").unwrap() {
        ModelSpec::Hub(m) => {
            assert_eq!((m.repo.as_str(), m.revision.as_str()), ("owner/name", "v2"));
            assert_eq!(
                m.gguf,
                Some(starling::source::hub::GgufChoice::Tag("Q4_K_M".into()))
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        ModelSpec::parse("starling-7b").unwrap().known_template(),
        Some("vicuna")
    );
}

#[test]
fn a_repo_with_only_bin_weights_and_tokenizer_model_answers_like_its_safetensors_twin() {
    let home = common::scratch("hub-bin");
    let hub = Hub::start();
    let endpoint = hub.endpoint();
    let pulled = answer(&starling(&home, Some(&endpoint), &[], &["pull", BIN_REPO]));
    assert!(pulled.contains("ready in"), "{pulled}");
    let greedy = [
        "run",
        "--model",
        BIN_REPO,
        "--temperature",
        "0",
        "-n",
        "24",
        "Hello",
    ];
    let out = starling(&home, Some(&endpoint), &[], &greedy);
    assert_eq!(answer(&out), golden_answer());
    let snap = home
        .join("hub/models--test-org--tiny-declare/snapshots")
        .join(COMMIT);
    assert!(snap.join("pytorch_model-00002-of-00002.bin").is_file());
    assert!(!snap.join("tokenizer.json").exists());
    let out = starling(
        &home,
        Some(&endpoint),
        &[],
        &["run", "--model", NO_WEIGHTS, "Hello"],
    );
    fails_with(&out, "test-org/no-weights has no usable weights");
}

#[test]
fn hf_token_opens_a_gated_repo_and_hf_hub_cache_moves_the_cache() {
    let home = common::scratch("hub-token");
    let hub = Hub::start();
    let endpoint = hub.endpoint();
    let args = [
        "run",
        "--model",
        GATED,
        "--temperature",
        "0",
        "-n",
        "24",
        "Hello",
    ];
    fails_with(
        &starling(&home, Some(&endpoint), &[], &args),
        "set HF_TOKEN",
    );
    let elsewhere = home.join("elsewhere");
    let envs = [
        ("HF_TOKEN", TOKEN),
        ("HF_HUB_CACHE", elsewhere.to_str().unwrap()),
    ];
    assert_eq!(
        answer(&starling(&home, Some(&endpoint), &envs, &args)),
        golden_answer()
    );
    assert!(
        elsewhere
            .join("models--test-org--gated/snapshots")
            .join(COMMIT)
            .join("config.json")
            .is_file()
    );
    assert!(
        !home.join("hub/models--test-org--gated").exists(),
        "HF_HUB_CACHE, not HF_HOME, holds it"
    );
}

#[test]
fn a_gguf_repo_downloads_only_the_chosen_file_and_runs_it_from_the_cache() {
    let home = common::scratch("hub-gguf-home");
    let mut hub = Hub::start();
    let endpoint = hub.endpoint();
    let tagged = format!("{GGUF_REPO}:Q8_0");
    let greedy = |model: &str, extra: &[&str]| {
        let mut args = vec!["run", "--model", model, "--temperature", "0", "-n", "24"];
        args.extend(extra);
        args.push("Hello");
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let local = common::tiny_model().display().to_string();
    let want_q8 = answer(&starling(
        &home,
        None,
        &[],
        &refs(&greedy(&local, &["--quantize", "q8_0"])),
    ));
    assert_eq!(
        answer(&starling(
            &home,
            Some(&endpoint),
            &[],
            &refs(&greedy(&tagged, &[]))
        )),
        want_q8
    );
    let snapshot = home
        .join("hub/models--test-org--tiny-gguf/snapshots")
        .join(COMMIT);
    let fetched: Vec<String> = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(fetched, vec!["tiny.Q8_0.gguf".to_string()]);

    let by_name = greedy(GGUF_REPO, &["--gguf-file", "tiny.F32.gguf"]);
    assert_eq!(
        answer(&starling(&home, Some(&endpoint), &[], &refs(&by_name))),
        golden_answer()
    );
    fails_with(
        &starling(
            &home,
            Some(&endpoint),
            &[],
            &refs(&greedy(&format!("{GGUF_REPO}:Q5_K_M"), &[])),
        ),
        "has no GGUF file tagged Q5_K_M; its GGUF files: tiny.F32.gguf, tiny.Q8_0.gguf",
    );
    fails_with(
        &starling(&home, Some(&endpoint), &[], &refs(&greedy(GGUF_REPO, &[]))),
        "choose one as owner/name:Q4_K_M or with --gguf-file",
    );

    // With the server gone, the tagged file runs from the cache.
    hub.stop();
    assert_eq!(
        answer(&starling(
            &home,
            None,
            &[("HF_HUB_OFFLINE", "1")],
            &refs(&greedy(&tagged, &[]))
        )),
        want_q8
    );
}

/// `starling serve` listens at once: while the model downloads (a slow hub
/// here) every route, `/health` included, is a 503 in OpenAI's shape; once
/// it has loaded, `/health` is 200 and answers come.
#[test]
fn serve_says_503_while_the_model_loads_then_200() {
    let hub = Hub::start();
    hub.hold.store(true, Ordering::SeqCst);
    let home = common::scratch("hub-serve-loading");
    let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["serve", "--model", REPO, "--port", "0"])
        .env("HF_HOME", &home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", hub.endpoint())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let _child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |needle: &str| -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {needle:?} line"));
            if let Some((_, rest)) = line.split_once(needle) {
                return rest.split_whitespace().next().unwrap().to_string();
            }
        }
    };
    let url = format!("http://{}", wait_for("listening on http://"));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let get = |path: &str| {
        let mut r = agent.get(format!("{url}{path}")).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    let (status, body) = get("/health");
    assert_eq!(status, 503, "{body}");
    let mut r = agent
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#)
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let error: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("loading"),
        "{error}"
    );

    hub.hold.store(false, Ordering::SeqCst);
    let ready = wait_for("ready on http://");
    assert_eq!(
        format!("http://{ready}"),
        url,
        "the same address throughout"
    );
    let (status, body) = get("/health");
    assert_eq!(status, 200, "{body}");
    let mut r = agent
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#)
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );
}

#[test]
fn a_known_reward_model_takes_the_gated_tokenizer_its_card_names() {
    let home = common::scratch("hub-reward");
    let hub = Hub::start();
    let endpoint = hub.endpoint();
    let case = &common::reward_reference()["cases"][0];
    let conv = home.join("conv.json");
    std::fs::write(&conv, case["messages"].to_string()).unwrap();
    let args = [
        "score",
        "--model",
        "starling-rm-7b",
        "--messages",
        conv.to_str().unwrap(),
    ];
    // Without a token: one line naming the gated repo and what to do.
    let out = starling(&home, Some(&endpoint), &[], &args);
    fails_with(&out, "meta-llama/Llama-2-7b-chat-hf is gated");
    fails_with(&out, "HF_TOKEN");
    // With one: the reward of the reference, from the .bin and the tokenizer alone.
    let out = starling(&home, Some(&endpoint), &[("HF_TOKEN", TOKEN)], &args);
    let got: f64 = answer(&out).trim().parse().unwrap();
    let want = case["score_last"].as_f64().unwrap();
    assert!((got - want).abs() <= 1e-4, "{got} vs {want}");
    let llama = home
        .join("hub/models--meta-llama--Llama-2-7b-chat-hf/snapshots")
        .join(COMMIT);
    assert!(llama.join("tokenizer.json").is_file());
    assert!(
        !llama.join("model.safetensors").exists(),
        "only the tokenizer is fetched"
    );
    // Then offline, from the cache.
    let out = starling(&home, None, &[("HF_HUB_OFFLINE", "1")], &args);
    let again: f64 = answer(&out).trim().parse().unwrap();
    assert_eq!(again, got);
    // `pull` fetches the same two parts into a fresh cache.
    let fresh = common::scratch("hub-reward-pull");
    let out = starling(
        &fresh,
        Some(&endpoint),
        &[("HF_TOKEN", TOKEN)],
        &["pull", "starling-rm-7b"],
    );
    let said = answer(&out);
    assert!(
        said.contains("meta-llama/Llama-2-7b-chat-hf (its tokenizer) ready"),
        "{said}"
    );
    let out = starling(&fresh, None, &[("HF_HUB_OFFLINE", "1")], &args);
    assert_eq!(answer(&out).trim().parse::<f64>().unwrap(), got);
}
