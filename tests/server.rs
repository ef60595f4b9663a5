//! `starling serve` over real HTTP on 127.0.0.1 (a free port), the tiny
//! model behind it: answers equal `starling run`'s, streamed and not;
//! concurrent clients each get their own answer; OpenAI-shaped errors; the
//! API key; a client that leaves frees its slot; SIGTERM lets a running
//! request finish and exits 0.

mod common;

use common::{golden, ok, starling, tiny_model};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    url: String,
    /// Everything the server wrote on stderr so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let model = tiny_model().display().to_string();
        let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["serve", "--model", &model, "--port", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some((_, url)) = line.split_once(" ready on http://") {
                    let _ = tx.send(format!("http://{url}"));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server said where it listens");
        Self { child, url, log }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    /// POSTs `body` (raw text) to `path`; the status and the body.
    fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
        let mut request = Self::agent()
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json");
        if let Some(k) = key {
            request = request.header("authorization", format!("Bearer {k}"));
        }
        let mut response = request.send(body).unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.body_mut().read_to_string().unwrap_or_default(),
        )
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (status, text) = self.post_raw(path, &body.to_string(), None);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut request = Self::agent().get(format!("{}{path}", self.url));
        if let Some(k) = key {
            request = request.header("authorization", format!("Bearer {k}"));
        }
        let mut response = request.call().unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.body_mut().read_to_string().unwrap_or_default(),
        )
    }

    /// A 6000-token answer streaming, its first chunk read: a slot held
    /// until the returned reader is dropped.
    fn long_stream(&self) -> impl BufRead {
        let mut long = chat_body("Hello", 6000);
        long["stream"] = true.into();
        let response = Self::agent()
            .post(format!("{}/v1/chat/completions", self.url))
            .header("content-type", "application/json")
            .send(long.to_string())
            .unwrap();
        let mut reader = BufReader::new(response.into_body().into_reader());
        let mut first = String::new();
        reader.read_line(&mut first).unwrap();
        assert!(
            first.starts_with("data: {") && !first.contains("\"error\""),
            "the long answer runs: {first}"
        );
        reader
    }

    /// A streamed request's `data:` payloads, in order.
    fn stream(&self, path: &str, body: Value) -> Vec<String> {
        let response = Self::agent()
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let reader = BufReader::new(response.into_body().into_reader());
        reader
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("data: ").map(String::from))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `name` in Prometheus text, on the series whose labels
/// include each of `labels` (`key="value"`); `None` if there is none.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, set) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let have: Vec<&str> = set.split(',').collect();
            (n == name && labels.iter().all(|want| have.contains(want)))
                .then(|| value.parse().ok())
                .flatten()
        })
}

/// Runs a script (stdin closed) that must succeed; its stdout. A failure
/// shows both of its outputs.
fn script_output(command: &mut Command) -> String {
    let out = command.stdin(Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

/// The name the server gives the tiny model (its directory's name).
fn server_model_name() -> String {
    tiny_model()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn golden_text(case: usize) -> String {
    golden()["cases"][case]["greedy"]["text"]
        .as_str()
        .unwrap()
        .to_string()
}

fn chat_body(content: &str, max_tokens: usize) -> Value {
    json!({
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

/// What `starling run` prints for one user message (greedy), without the newline.
fn run_answer(content: &str, max_tokens: usize) -> String {
    let model = tiny_model().display().to_string();
    let n = max_tokens.to_string();
    let out = ok(&starling(
        &[
            "run",
            "--model",
            &model,
            "--temperature",
            "0",
            "-n",
            &n,
            content,
        ],
        None,
    ));
    out.strip_suffix('\n').unwrap().to_string()
}

#[test]
fn chat_answers_equal_run_streamed_and_not_with_usage_and_reuse() {
    let server = Server::start(&[]);
    let (status, body) = server.post("/v1/chat/completions", chat_body("Hello", 24));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], golden_text(0));
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["prompt_tokens"], 17);
    assert_eq!(body["usage"]["completion_tokens"], 24);
    assert_eq!(body["usage"]["total_tokens"], 41);

    let mut streamed = chat_body("Hello", 24);
    streamed["stream"] = true.into();
    streamed["stream_options"] = json!({"include_usage": true});
    let events = server.stream("/v1/chat/completions", streamed);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, golden_text(0));
    let finish = chunks
        .iter()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 24);
    // The same conversation again: its prompt is in the kept cache.
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 16);
    // A stream's log line comes when it ends, with its tokens.
    std::thread::sleep(Duration::from_millis(200));
    let log = server.log.lock().unwrap().join("\n");
    assert!(
        log.contains("stream=done prompt_tokens=17 completion_tokens=24"),
        "{log}"
    );

    // Another question answers as `starling run` does.
    let (_, other) = server.post(
        "/v1/chat/completions",
        chat_body("Why is the sky blue?", 12),
    );
    assert_eq!(
        other["choices"][0]["message"]["content"],
        run_answer("Why is the sky blue?", 12)
    );

    // /metrics: Prometheus text whose counters match what was served.
    let (status, text) = server.get("/metrics", None);
    assert_eq!(status, 200);
    assert_eq!(text.lines().last(), Some("# EOF"), "{text}");
    let value = |name: &str| -> f64 {
        metric(&text, name, &[]).unwrap_or_else(|| panic!("{name} in {text}"))
    };
    // Every series names the model, as vLLM's do.
    let model = format!("model_name=\"{}\"", server_model_name());
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains(&model), "{line}");
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let v = line.rsplit(' ').next().unwrap();
        assert!(v.parse::<f64>().is_ok(), "not a sample: {line}");
    }
    let prompts = [
        17.0,
        17.0,
        other["usage"]["prompt_tokens"].as_f64().unwrap(),
    ];
    let cached = 16.0
        + other["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_f64()
            .unwrap();
    assert_eq!(value("vllm:generation_tokens_total"), 24.0 + 24.0 + 12.0);
    assert_eq!(
        value("vllm:prefix_cache_queries_total"),
        prompts.iter().sum::<f64>()
    );
    assert_eq!(value("vllm:prefix_cache_hits_total"), cached);
    assert_eq!(
        value("vllm:prompt_tokens_total"),
        prompts.iter().sum::<f64>() - cached
    );
    assert_eq!(
        metric(
            &text,
            "vllm:request_success_total",
            &["finished_reason=\"length\""]
        ),
        Some(3.0)
    );
    assert_eq!(value("vllm:num_requests_running"), 0.0);
    assert_eq!(value("vllm:num_requests_waiting"), 0.0);
    assert_eq!(value("vllm:time_to_first_token_seconds_count"), 3.0);
    assert_eq!(value("vllm:request_queue_time_seconds_count"), 3.0);
}

/// A full queue is a 429 with Retry-After, not an unbounded wait.
#[test]
fn a_full_queue_gets_429_with_retry_after() {
    let server = Server::start(&["--parallel", "1", "--max-queue", "0"]);
    let reader = server.long_stream();
    let mut second = Server::agent()
        .post(format!("{}/v1/chat/completions", server.url))
        .header("content-type", "application/json")
        .send(chat_body("Hi", 3).to_string())
        .unwrap();
    assert_eq!(second.status().as_u16(), 429);
    assert_eq!(second.headers().get("retry-after").unwrap(), "1");
    let body = second.body_mut().read_to_string().unwrap();
    assert!(body.contains("queue is full"), "{body}");
    let (_, metrics) = server.get("/metrics", None);
    assert_eq!(
        metric(&metrics, "vllm:num_requests_running", &[]),
        Some(1.0),
        "{metrics}"
    );
    // Tokens count as they are generated, not when the answer ends.
    let generated = metric(&metrics, "vllm:generation_tokens_total", &[]).unwrap();
    assert!(generated > 0.0, "{metrics}");
    drop(reader);
}

/// A client that gives up while its request waits for a slot leaves the
/// queue at once: the next request is not refused for its sake.
#[test]
fn a_queued_client_that_leaves_frees_its_place_in_the_queue() {
    let server = Server::start(&["--parallel", "1", "--max-queue", "1"]);
    let reader = server.long_stream();
    // Waits for the slot, and gives up after a second.
    let impatient: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(1)))
        .build()
        .into();
    let gave_up = impatient
        .post(format!("{}/v1/chat/completions", server.url))
        .header("content-type", "application/json")
        .send(chat_body("Hi", 3).to_string());
    assert!(gave_up.is_err(), "it was queued, so it timed out");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, metrics) = server.get("/metrics", None);
        if metric(&metrics, "vllm:num_requests_waiting", &[]) == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "still waiting: {metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The queue has room again: a new request waits (202-free) rather than a 429.
    let url = server.url.clone();
    let next = std::thread::spawn(move || {
        Server::agent()
            .post(format!("{url}/v1/chat/completions"))
            .header("content-type", "application/json")
            .send(chat_body("Hi", 3).to_string())
            .unwrap()
            .status()
            .as_u16()
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(reader);
    assert_eq!(next.join().unwrap(), 200);
    let log = server.log.lock().unwrap().join("\n");
    // The stream the client left logs the tokens it did generate.
    let left = log
        .lines()
        .find(|l| l.contains("stream=client_left"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(!left.contains("completion_tokens=0 "), "{left}");
}

#[test]
fn completions_continue_a_raw_prompt_as_run_does() {
    let server = Server::start(&[]);
    let body = json!({"prompt": "The quick brown fox", "temperature": 0, "max_tokens": 10});
    let (status, reply) = server.post("/v1/completions", body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "text_completion");
    let model = tiny_model().display().to_string();
    let expected = ok(&starling(
        &[
            "run",
            "--model",
            &model,
            "--template",
            "raw",
            "--temperature",
            "0",
            "-n",
            "10",
            "The quick brown fox",
        ],
        None,
    ));
    assert_eq!(
        reply["choices"][0]["text"].as_str().unwrap(),
        expected.strip_suffix('\n').unwrap()
    );
    // vLLM's /tokenize and /detokenize: the ids `run` feeds, and back.
    let messages = json!({"messages": [{"role": "user", "content": "Hello"}]});
    let (status, ids) = server.post("/tokenize", messages);
    assert_eq!(status, 200, "{ids}");
    assert_eq!(
        ids["tokens"],
        json!(common::ids(&golden()["cases"][0]["prompt"]["ids"]))
    );
    assert_eq!(ids["count"], 17);
    let (_, text) = server.post("/tokenize", json!({"prompt": "hi there"}));
    let (status, back) = server.post("/detokenize", json!({"tokens": text["tokens"]}));
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["prompt"], "hi there");
    assert_eq!(
        server.post("/detokenize", json!({"tokens": [99999999]})).0,
        400
    );
    assert_eq!(server.post("/tokenize", json!({})).0, 400);
    let aliased = Server::start(&["--alias", "my-model"]);
    let mut asked = json!({"prompt": "hi", "max_tokens": 2, "model": "my-model"});
    let (status, reply2) = aliased.post("/v1/completions", asked.take());
    assert_eq!(status, 200, "{reply2}");
    assert_eq!(
        reply2["model"], "my-model",
        "the name the client asked by comes back"
    );
    assert_eq!(aliased.get("/v1/models/my-model", None).0, 200);
    assert_eq!(aliased.get("/v1/models/other", None).0, 404);
    let (_, models) = server.get("/v1/models", None);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert!(
        models["data"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("tiny-mistral")
    );
}

#[test]
fn concurrent_streams_each_get_the_answer_they_get_alone() {
    let server = Server::start(&["--parallel", "4", "--batch-tokens", "8"]);
    let questions: Vec<String> = (0..6)
        .map(|i| format!("Question {i}: {}", "tell me ".repeat(i)))
        .collect();
    let alone: Vec<String> = questions
        .iter()
        .map(|q| {
            let (_, body) = server.post("/v1/chat/completions", chat_body(q, 10));
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = questions
            .iter()
            .map(|q| {
                let server = &server;
                s.spawn(move || {
                    let mut body = chat_body(q, 10);
                    body["stream"] = true.into();
                    server
                        .stream("/v1/chat/completions", body)
                        .iter()
                        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                        .filter_map(|c| {
                            c["choices"][0]["delta"]["content"]
                                .as_str()
                                .map(String::from)
                        })
                        .collect::<String>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
}

#[test]
fn bad_requests_get_openai_shaped_errors_never_a_500() {
    let server = Server::start(&["--max-body", "2000"]);
    let check = |status: u16, body: &str, expected: u16, needle: &str| {
        assert_eq!(status, expected, "{body}");
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        let message = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{body}"));
        assert!(v["error"]["type"].is_string(), "{body}");
        assert!(
            message.contains(needle) || v["error"]["param"] == needle,
            "{needle} in {body}"
        );
    };
    let (s, b) = server.post_raw("/v1/chat/completions", "{not json", None);
    check(s, &b, 400, "invalid request body");
    let bad = |edit: &dyn Fn(&mut Value)| {
        let mut body = chat_body("Hello", 4);
        edit(&mut body);
        server.post_raw("/v1/chat/completions", &body.to_string(), None)
    };
    let (s, b) = bad(&|b| b["temperature"] = (-1).into());
    check(s, &b, 400, "temperature");
    let (s, b) = bad(&|b| b["top_p"] = 0.into());
    check(s, &b, 400, "top_p");
    let (s, b) = bad(&|b| b["n"] = 0.into());
    check(s, &b, 400, "n");
    let (s, b) = bad(&|b| b["max_tokens"] = 100_000.into());
    check(s, &b, 400, "max_tokens");
    let (s, b) = bad(&|b| b["model"] = "gpt-4".into());
    check(s, &b, 404, "gpt-4");
    let (s, b) = bad(&|b| b["tools"] = json!([{"type": "function"}]));
    check(s, &b, 400, "tools");
    let (s, b) = bad(&|b| b["messages"] = json!([]));
    check(s, &b, 400, "messages");
    let (s, b) = bad(&|b| b["messages"][0]["role"] = "wizard".into());
    check(s, &b, 400, "messages[0]");
    let (s, b) = bad(&|b| b["messages"][0]["content"] = Value::Null);
    check(s, &b, 400, "messages[0]");
    let (s, b) = bad(&|b| b["audio"] = json!({}));
    check(s, &b, 400, "audio");
    let (s, b) = bad(&|b| b["messages"][0]["content"] = "x".repeat(5000).into());
    check(s, &b, 413, "length limit");
    let (s, b) = bad(&|b| b["presence_penalty"] = 3.into());
    check(s, &b, 400, "presence_penalty");
    let (s, b) = bad(&|b| b["frequency_penalty"] = 1.5.into());
    assert_eq!(s, 200, "OpenAI's penalties are honoured: {b}");
    let (s, _) = bad(&|b| b["tools"] = json!([]));
    assert_eq!(s, 200, "an empty tools list is the default");
    // An empty or false value of another type than the field's default is
    // refused, as the OpenAPI document says (schemathesis sent these).
    for (field, value) in [
        ("modalities", json!(false)),
        ("modalities", json!([])),
        ("tools", json!(false)),
        ("tools", json!({})),
        ("tool_choice", json!(false)),
        ("functions", json!({})),
        ("function_call", json!([])),
        ("response_format", json!(false)),
        ("echo", json!([])),
        ("audio", json!(false)),
        ("prediction", json!([])),
    ] {
        let (s, b) = bad(&|b| b[field] = value.clone());
        check(s, &b, 400, field);
    }
    let (s, b) = server.post_raw(
        "/v1/completions",
        &json!({"prompt": [1, 99999999]}).to_string(),
        None,
    );
    check(s, &b, 400, "prompt");
    let (s, b) = server.get("/v1/nothing", None);
    check(s, &b, 404, "no such route");
    let (s, b) = server.get("/v1/chat/completions", None);
    check(s, &b, 405, "method");
    let (s, b) = bad(&|b| b["top_p"] = 2.into());
    check(s, &b, 400, "top_p");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["param"],
        "top_p"
    );
    // A prompt over the context: OpenAI's code for it.
    let huge = json!({"prompt": vec![5u32; 9000]}).to_string();
    let big = Server::start(&["--max-body", "100000"]);
    let (s, b) = big.post_raw("/v1/completions", &huge, None);
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("context_length_exceeded"), "{b}");
    // With max_tokens too, the prompt is still what is at fault.
    let huge = json!({"prompt": vec![5u32; 9000], "max_tokens": 1}).to_string();
    let (s, b) = big.post_raw("/v1/completions", &huge, None);
    check(s, &b, 400, "prompt");
    assert!(b.contains("context_length_exceeded"), "{b}");
    // One prompt in a list is that prompt; several are refused by name.
    let (s, b) = big.post_raw(
        "/v1/completions",
        &json!({"prompt": ["hi"], "max_tokens": 2}).to_string(),
        None,
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = big.post_raw(
        "/v1/completions",
        &json!({"prompt": ["a", "b"]}).to_string(),
        None,
    );
    check(s, &b, 400, "prompt");
    // A declared body over the limit is refused before it is sent.
    use std::io::{Read, Write};
    let address = server.url.trim_start_matches("http://");
    let mut socket = std::net::TcpStream::connect(address).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        socket,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{{"
    )
    .unwrap();
    let mut reply = vec![0u8; 512];
    let n = socket.read(&mut reply).unwrap();
    let head = String::from_utf8_lossy(&reply[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}

/// `logprobs`: the model's own log-softmax per generated token, the same
/// streamed and not; with greedy decoding and no penalty the drawn token
/// is the most likely alternative. `logit_bias` moves the draw, and bad
/// values of either are 400s naming the field.
#[test]
fn logprobs_and_logit_bias_follow_openai() {
    let server = Server::start(&[]);
    let mut body = chat_body("Hello", 12);
    body["logprobs"] = true.into();
    body["top_logprobs"] = 3.into();
    body["repetition_penalty"] = 1.into();
    let (status, whole) = server.post("/v1/chat/completions", body.clone());
    assert_eq!(status, 200, "{whole}");
    let content = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("{whole}"))
        .clone();
    assert_eq!(content.len(), 12, "one entry per generated token");
    let mut bytes = Vec::new();
    for entry in &content {
        let logprob = entry["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0, "{entry}");
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{entry}");
        assert_eq!(
            top[0]["token"], entry["token"],
            "greedy takes the most likely"
        );
        assert!((top[0]["logprob"].as_f64().unwrap() - logprob).abs() < 1e-6);
        let values: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "{entry}");
        bytes.extend(
            entry["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
    // The answer's text is its tokens' bytes (the first word's space aside).
    assert_eq!(
        String::from_utf8_lossy(&bytes).trim_start(),
        text.trim_start()
    );

    // Streamed: the same entries, spread over the chunks.
    body["stream"] = true.into();
    let mut streamed = Vec::new();
    for data in server.stream("/v1/chat/completions", body.clone()) {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        if let Some(entries) = chunk["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(entries.iter().cloned());
        }
    }
    assert_eq!(streamed, content);

    // Completions: legacy parallel lists whose tokens spell the text.
    let (status, completion) = server.post(
        "/v1/completions",
        json!({"prompt": "Once upon", "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(status, 200, "{completion}");
    let lp = &completion["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 6, "{completion}");
    if !tokens.iter().any(|t| t.starts_with("bytes:")) {
        assert_eq!(
            tokens.concat(),
            completion["choices"][0]["text"].as_str().unwrap()
        );
    }
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(
        lp["top_logprobs"][0].as_object().unwrap().len(),
        2,
        "{completion}"
    );

    // logit_bias: -100 bans the greedy first token, +100 forces another.
    let first = |bias: Value| {
        let mut b = chat_body("Hello", 3);
        b["logit_bias"] = bias;
        b["logprobs"] = true.into();
        let (status, v) = server.post("/v1/chat/completions", b);
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["token"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let plain = first(json!({}));
    // The greedy token's id: the last of its text's ids (SentencePiece may
    // put a `▁` before it), checked by decoding it back.
    let greedy_id = {
        let (_, t) = server.post(
            "/tokenize",
            json!({"prompt": plain[0].clone(), "add_special_tokens": false}),
        );
        let id = t["tokens"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .as_u64()
            .unwrap();
        let (_, back) = server.post("/detokenize", json!({"tokens": [id]}));
        assert_eq!(back["prompt"].as_str().unwrap().trim(), plain[0].trim());
        id
    };
    let banned = first(json!({ greedy_id.to_string(): -100 }));
    assert_ne!(banned[0], plain[0], "a banned token is not drawn");
    let forced = first(json!({"300": 100}));
    let (_, t) = server.post("/detokenize", json!({"tokens": [300]}));
    let piece = t["prompt"].as_str().unwrap().to_string();
    assert!(
        forced.iter().all(|f| f.trim() == piece.trim()),
        "{forced:?} vs {piece:?}"
    );

    for (edit, param) in [
        (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
        (json!({"logit_bias": {"5": 101}}), "logit_bias"),
        (json!({"logit_bias": [1, 2]}), "logit_bias"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"logprobs": 3}), "logprobs"),
    ] {
        let mut b = chat_body("Hello", 2);
        for (k, v) in edit.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (status, v) = server.post("/v1/chat/completions", b);
        assert_eq!(status, 400, "{edit}: {v}");
        assert_eq!(v["error"]["param"], param, "{edit}: {v}");
    }
    let (status, v) = server.post(
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 2, "logprobs": 21}),
    );
    assert_eq!(
        (status, &v["error"]["param"]),
        (400, &json!("logprobs")),
        "{v}"
    );
}

/// The official `openai` Python client against the server: chat streamed
/// and not, `stop`, `seed` with `n=2`, logprobs, the usage chunk, raw
/// completions, `models.list` and typed errors, each answer checked against
/// `starling run` (scripts/openai-client.py says what it checks).
#[test]
fn the_official_openai_python_client_gets_what_starling_run_gives() {
    let python = common::openai_python();
    let server = Server::start(&[]);
    let model = tiny_model().display().to_string();
    let stdout = script_output(
        Command::new(python)
            .arg(common::root().join("scripts/openai-client.py"))
            .args(["--base-url", &format!("{}/v1", server.url)])
            .args(["--starling", env!("CARGO_BIN_EXE_starling")])
            .args(["--model", &model]),
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert!(stdout.contains("ok n=2 choice 1 equals"), "{stdout}");
    assert!(stdout.contains("ok stop\n"), "the stop check ran: {stdout}");
}

/// API fuzzing: schemathesis (scripts/api-fuzz.sh) sends thousands of
/// generated and mutated requests built from `/openapi.json` for 90 s (its
/// coverage phase alone takes about 45 s on 2 busy cores):
/// no 5xx, no hang, no response that breaks the documented schema, status
/// codes or content types, no bad data accepted; the server never panics.
#[test]
fn schemathesis_finds_no_server_error_against_the_openapi_document() {
    // A small context: an answer without max_tokens ends quickly.
    let server = Server::start(&["--ctx-size", "256"]);
    let stdout = script_output(
        Command::new("bash")
            .arg(common::root().join("scripts/api-fuzz.sh"))
            .args([server.url.as_str(), "90"]),
    );
    let generated: usize = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_suffix(" passed")?
                .split(", ")
                .last()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    assert!(generated > 500, "only {generated} cases passed:\n{stdout}");
    let log = server.log.lock().unwrap().join("\n");
    assert!(!log.contains("panicked"), "{log}");
}

/// Two replicas behind nginx (scripts/replicas.sh): 32 requests arriving
/// over a few seconds, one replica stopped with SIGTERM halfway; every
/// request completes or is refused with a retryable status, none is lost
/// or hangs, and the stopped replica drains and exits 0.
#[test]
fn replicas_behind_nginx_lose_no_request_when_one_stops() {
    let model = tiny_model().display().to_string();
    let stdout = script_output(
        Command::new("bash")
            .arg(common::root().join("scripts/replicas.sh"))
            .args([model.as_str(), "32", "400"])
            .env("STARLING", env!("CARGO_BIN_EXE_starling")),
    );
    assert!(stdout.contains("replica A exited 0"), "{stdout}");
    assert!(
        !stdout.contains("lost") && !stdout.contains("hung"),
        "{stdout}"
    );
}

/// The chat page: `/`, its script and its style, open without the key
/// (the page asks for it), under a Content-Security-Policy that allows no
/// script or connection but this server's; nothing loaded from elsewhere;
/// `--no-web` turns it off.
#[test]
fn the_chat_page_is_served_self_contained_and_can_be_turned_off() {
    let server = Server::start(&["--api-key", "k"]);
    let agent = Server::agent();
    let fetch = |path: &str| {
        let mut r = agent.get(format!("{}{path}", server.url)).call().unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.body_mut().read_to_string().unwrap())
    };
    let (status, headers, page) = fetch("/");
    assert_eq!(status, 200, "{page}");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(
        policy.contains("script-src 'self'") && !policy.contains("unsafe-inline"),
        "{policy}"
    );
    assert!(page.contains(r#"<script src="/chat.js">"#), "{page}");
    let (status, headers, script) = fetch("/chat.js");
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(script.contains("/v1/chat/completions"));
    let (status, _, style) = fetch("/chat.css");
    assert_eq!(status, 200);
    for (name, text) in [("page", &page), ("script", &script), ("style", &style)] {
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "the {name} loads nothing from elsewhere"
        );
        // Model text is set as text, never parsed as HTML.
        assert!(
            !text.contains("innerHTML") && !text.contains("insertAdjacentHTML"),
            "{name}"
        );
    }
    // The API still wants the key.
    let (status, _, _) = fetch("/v1/models");
    assert_eq!(status, 401);

    let off = Server::start(&["--no-web"]);
    let mut r = agent.get(format!("{}/", off.url)).call().unwrap();
    assert_eq!(
        r.status().as_u16(),
        404,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );
}

/// The chat page in headless Chromium (scripts/browser-test.sh, Playwright):
/// "Hello" streams run's greedy answer with its figures, stop cancels the
/// sequence on the server, a reload keeps the conversation, markup in an
/// answer stays text, a wrong key reads as a sentence; screenshots (desktop
/// and phone width) land in target/browser-test.
#[test]
fn the_chat_page_works_in_a_real_browser() {
    let plain = Server::start(&[]);
    let keyed = Server::start(&["--api-key", "right"]);
    let shots = common::root().join("target/browser-test");
    let model = tiny_model().display().to_string();
    let stdout = script_output(
        Command::new("bash")
            .arg(common::root().join("scripts/browser-test.sh"))
            .args([plain.url.as_str(), keyed.url.as_str()])
            .arg(env!("CARGO_BIN_EXE_starling"))
            .arg(&model)
            .arg(&shots),
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    for shot in ["chat-answer.png", "chat-desktop.png", "chat-phone.png"] {
        assert!(shots.join(shot).metadata().unwrap().len() > 1000, "{shot}");
    }
}

/// `chat_template_kwargs: {"mode": "code"}` answers in OpenChat's coding
/// format, as `run --template openchat-code` does; on a model whose template
/// is not OpenChat's, or with an unknown mode, it is a 400 naming the field.
#[test]
fn openchat_code_mode_is_a_request_option() {
    let server = Server::start(&[]);
    let mut body = chat_body("Write a loop", 12);
    body["chat_template_kwargs"] = json!({"mode": "code"});
    let (status, reply) = server.post("/v1/chat/completions", body.clone());
    assert_eq!(status, 200, "{reply}");
    let model = tiny_model().display().to_string();
    let expected = ok(&starling(
        &[
            "run",
            "--model",
            &model,
            "--template",
            "openchat-code",
            "--temperature",
            "0",
            "-n",
            "12",
            "Write a loop",
        ],
        None,
    ));
    assert_eq!(
        reply["choices"][0]["message"]["content"].as_str().unwrap(),
        expected.strip_suffix('\n').unwrap()
    );
    assert_ne!(
        server
            .post("/v1/chat/completions", chat_body("Write a loop", 12))
            .1["choices"][0]["message"]["content"],
        reply["choices"][0]["message"]["content"],
        "the mode changes the prompt"
    );
    body["chat_template_kwargs"] = json!({"mode": "poetry"});
    let (status, v) = server.post("/v1/chat/completions", body.clone());
    assert_eq!(
        (status, &v["error"]["param"]),
        (400, &json!("chat_template_kwargs")),
        "{v}"
    );
    // Its type is checked whatever else the request holds (schemathesis found
    // a string taken by /tokenize next to a prompt).
    let (status, v) = server.post(
        "/tokenize",
        json!({"prompt": "x", "chat_template_kwargs": "code"}),
    );
    assert_eq!(
        (status, &v["error"]["param"]),
        (400, &json!("chat_template_kwargs")),
        "{v}"
    );
    let vicuna = Server::start(&["--template", "vicuna"]);
    body["chat_template_kwargs"] = json!({"mode": "code"});
    let (status, v) = vicuna.post("/v1/chat/completions", body);
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("vicuna"),
        "{v}"
    );
}

/// `--cors-origin`: a browser's preflight is answered without a key, and
/// answers carry the allowed origin.
#[test]
fn cors_lets_the_given_origin_call_the_api() {
    let server = Server::start(&["--api-key", "k", "--cors-origin", "http://localhost:3000"]);
    let agent = Server::agent();
    let preflight = agent
        .options(format!("{}/v1/chat/completions", server.url))
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .call()
        .unwrap();
    assert_eq!(preflight.status().as_u16(), 200);
    assert_eq!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .unwrap(),
        "http://localhost:3000"
    );
    let models = agent
        .get(format!("{}/v1/models", server.url))
        .header("origin", "http://elsewhere.example")
        .header("authorization", "Bearer k")
        .call()
        .unwrap();
    assert!(
        models
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[test]
fn an_api_key_guards_everything_but_health() {
    let server = Server::start(&["--api-key", "sesame"]);
    assert_eq!(server.get("/health", None).0, 200);
    let (s, b) = server.get("/v1/models", None);
    assert_eq!(s, 401, "{b}");
    assert!(b.contains("invalid_api_key"), "{b}");
    assert_eq!(server.get("/v1/models", Some("wrong")).0, 401);
    assert_eq!(server.get("/v1/models", Some("sesame")).0, 200);
    // The scheme's name is case-insensitive.
    let agent = Server::agent();
    let mut lower = agent
        .get(format!("{}/v1/models", server.url))
        .header("authorization", "bearer sesame")
        .call()
        .unwrap();
    assert_eq!(
        lower.status().as_u16(),
        200,
        "{:?}",
        lower.body_mut().read_to_string()
    );
    let body = chat_body("Hello", 2).to_string();
    assert_eq!(server.post_raw("/v1/chat/completions", &body, None).0, 401);
    assert_eq!(
        server
            .post_raw("/v1/chat/completions", &body, Some("sesame"))
            .0,
        200
    );
}

#[test]
fn a_client_that_leaves_frees_its_slot() {
    let server = Server::start(&["--parallel", "1"]);
    let reader = server.long_stream();
    // A second request queues behind the long answer.
    let url = server.url.clone();
    let queued = std::thread::spawn(move || {
        let mut response = Server::agent()
            .post(format!("{url}/v1/chat/completions"))
            .header("content-type", "application/json")
            .send(chat_body("Hi", 3).to_string())
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            Instant::now(),
            response.body_mut().read_to_string().unwrap(),
        )
    });
    let gauge = |name: &str| -> f64 {
        let (_, text) = server.get("/metrics", None);
        let (name, labels) = match name.split_once('{') {
            Some((n, l)) => (n, vec![l.trim_end_matches('}')]),
            None => (name, vec![]),
        };
        metric(&text, name, &labels).unwrap_or_else(|| panic!("{name} in {text}"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while gauge("vllm:num_requests_waiting") < 1.0 {
        assert!(Instant::now() < deadline, "the second request never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    // The client leaves: the queued request gets the slot within a second.
    let left = Instant::now();
    drop(reader);
    let (status, done, body) = queued.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        done - left < Duration::from_secs(1),
        "the queued request took {:?} after the client left",
        done - left
    );
    // The engine's bookkeeping follows the answers within moments: the
    // running gauge drops, both answers are observed (the waiting one in the
    // queue-time histogram), and the one cut short counts as an abort.
    let settled = Instant::now() + Duration::from_secs(2);
    while (gauge("vllm:num_requests_running") != 0.0
        || gauge("vllm:request_queue_time_seconds_count") != 2.0
        || gauge("vllm:request_success_total{finished_reason=\"abort\"}") != 1.0)
        && Instant::now() < settled
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(gauge("vllm:num_requests_running"), 0.0);
    assert_eq!(gauge("vllm:request_queue_time_seconds_count"), 2.0);
    assert!(gauge("vllm:request_queue_time_seconds_sum") >= 0.2);
    assert_eq!(
        gauge("vllm:request_success_total{finished_reason=\"abort\"}"),
        1.0
    );
}

#[test]
fn sigterm_lets_a_running_request_finish_then_exits_zero() {
    let mut server = Server::start(&[]);
    let url = server.url.clone();
    let request = std::thread::spawn(move || {
        let body = chat_body("Hello", 400).to_string();
        let mut response = Server::agent()
            .post(format!("{url}/v1/chat/completions"))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        (status, text)
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (status, text) = request.join().unwrap();
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 400);
    let exit = server.child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
}

/// Draining after SIGTERM: while an answer is in flight, `/health` and any
/// new request get 503 with Retry-After (a balancer moves on), `/metrics`
/// still answers; once nothing is in flight the server exits 0.
#[test]
fn draining_answers_503_until_nothing_is_in_flight() {
    let mut server = Server::start(&[]);
    let reader = server.long_stream();
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.get("/health", None).0 != 503 {
        assert!(Instant::now() < deadline, "/health never said 503");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut refused = Server::agent()
        .post(format!("{}/v1/chat/completions", server.url))
        .header("content-type", "application/json")
        .send(chat_body("Hi", 3).to_string())
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body = refused.body_mut().read_to_string().unwrap();
    assert!(body.contains("shutting down"), "{body}");
    assert_eq!(server.get("/metrics", None).0, 200);
    // The only answer in flight ends (its client leaves): the server exits 0.
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

/// A stream still running when the shutdown timeout is over is ended, not
/// cut: its last chunk (with a finish reason) and `[DONE]` still come, and
/// the server exits 0.
#[test]
fn the_shutdown_timeout_ends_streams_properly() {
    let mut server = Server::start(&["--shutdown-timeout", "1"]);
    let mut reader = server.long_stream();
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let events: Vec<&str> = rest
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{rest}");
    let finish: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert!(
        finish["choices"][0]["finish_reason"].is_string(),
        "{finish}"
    );
    drop(reader);
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
}
