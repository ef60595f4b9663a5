//! `starling serve`: an OpenAI-compatible HTTP front end on the engine
//! (axum on tokio). As in llama.cpp's server, the HTTP side only queues
//! work; the engine's one step loop owns the model and batches every
//! client's sequences.

pub mod error;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod routes;
pub mod schema;
pub mod web;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::ApiError;
use routes::{AppState, RequestLog, Served, Shared, Streaming};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where and how to listen.
pub struct Listen {
    pub host: String,
    pub port: u16,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// Origins browsers may call from (`*`: any); none: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Serve the chat page at `/`.
    pub web: bool,
}

/// The routes over `state`: `/health`, `/metrics`, `/openapi.json` and the
/// chat page (when `web`) open to all, the rest behind the API key when
/// one is set; every request logged on stderr.
pub fn router(
    state: Shared,
    max_body: usize,
    cors_origins: &[String],
    web: bool,
) -> Result<Router> {
    let api = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{id}", get(routes::model))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_key));
    let open = if web { web::routes() } else { Router::new() };
    let app = open
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .merge(api)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(max_body, refuse_oversized))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_while_draining,
        ))
        .layer(middleware::from_fn(log_request))
        .with_state(state);
    if cors_origins.is_empty() {
        return Ok(app);
    }
    // Outermost: a browser's preflight (OPTIONS, no key) is answered here.
    use axum::http::{Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins = if cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = cors_origins
            .iter()
            .map(|o| {
                o.parse()
                    .with_context(|| format!("--cors-origin {o:?} is not a valid origin"))
            })
            .collect::<Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    let cors = CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]);
    Ok(app.layer(cors))
}

/// What answers while the model loads: 503 on every route, `/health`
/// included, so a load balancer or a readiness probe waits for it; the
/// chat page (when `web`) loads and says the model is loading.
fn loading_router(web: bool) -> Router {
    let router = if web { web::routes() } else { Router::new() };
    router.fallback(|| async { ApiError::unavailable("the model is still loading; retry shortly") })
}

/// Listens at once, answering 503 while `load` loads the model (on this
/// thread), then serves the API until SIGINT or SIGTERM, then lets
/// in-flight requests finish (for at most `shutdown_timeout`) and returns.
/// A failed load is returned as the error it is.
pub fn serve(listen: Listen, load: impl FnOnce() -> Result<AppState>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The model runs on the engine's own threads: HTTP needs few.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let socket = std::net::TcpListener::bind((listen.host.as_str(), listen.port))
        .with_context(|| format!("listening on {}:{}", listen.host, listen.port))?;
    socket
        .set_nonblocking(true)
        .context("setting the socket non-blocking")?;
    let address = socket.local_addr().context("reading the bound address")?;
    eprintln!(
        "starling serve: listening on http://{address} while the model loads (503 until ready)"
    );
    // Two listeners on one socket, one after the other: connections that
    // arrive between them wait in the kernel's backlog.
    let early = socket.try_clone().context("sharing the socket")?;
    let web = listen.web;
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel::<()>();
    let loading = runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(early)?;
        axum::serve(listener, loading_router(web))
            .with_graceful_shutdown(async move {
                let _ = loaded_rx.await;
            })
            .await
    });
    let state = load();
    let _ = loaded_tx.send(());
    runtime
        .block_on(loading)
        .context("the loading server task")?
        .context("serving while loading")?;
    let state = Arc::new(state?);
    runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::from_std(socket).context("listening after the load")?;
        eprintln!(
            "starling serve: {} ready on http://{address}",
            state.names[0]
        );
        let app = router(
            state.clone(),
            listen.max_body,
            &listen.cors_origins,
            listen.web,
        )?;
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = close_rx.await;
        });
        let mut server = tokio::spawn(async move { server.await });
        tokio::select! {
            joined = &mut server => return joined.context("the server task")?.context("serving"),
            () = shutdown_signal() => {}
        }
        // Draining: every new request (and /health) gets 503 with
        // Retry-After, so balancers and probes move on, while the answers
        // in flight get `shutdown_timeout` to finish.
        eprintln!(
            "starling serve: draining (new requests get 503; {} in flight may finish)",
            state.in_flight.load(Ordering::Relaxed)
        );
        state.draining.store(true, Ordering::Relaxed);
        let idle = |wait: Duration| {
            let state = state.clone();
            async move {
                let until = Instant::now() + wait;
                while state.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                state.in_flight.load(Ordering::Relaxed) == 0
            }
        };
        if !idle(listen.shutdown_timeout).await {
            eprintln!("starling serve: cutting off in-flight requests after the shutdown timeout");
            // Their sequences end at the engine's next step; the answers
            // still close properly (finish chunk, `[DONE]`).
            state.cutoff.store(true, Ordering::Relaxed);
            idle(Duration::from_secs(5)).await;
        }
        // Then stop accepting, and close the connections once their last
        // response has gone out.
        let _ = close_tx.send(());
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(joined) => joined.context("the server task")?.context("serving")?,
            Err(_) => eprintln!("starling serve: connections still open after the drain; exiting"),
        }
        anyhow::Ok(())
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// `Authorization: Bearer KEY` with one of the keys, when any is set.
async fn require_key(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if state.api_keys.is_empty() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110, 11.1).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    match given {
        Some(key) if state.api_keys.iter().any(|k| k == key) => next.run(request).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// While draining after SIGTERM, a new request is a 503 with Retry-After
/// (a balancer sends it elsewhere); `/metrics` still answers.
async fn refuse_while_draining(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    if state.draining.load(Ordering::Relaxed) && request.uri().path() != "/metrics" {
        return ApiError::unavailable("the server is shutting down; retry (another replica)")
            .into_response();
    }
    next.run(request).await
}

/// A declared body over the limit is refused before it is read (the body
/// limit alone would wait for bytes that may never come).
async fn refuse_oversized(State(max_body): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        return ApiError::invalid(format!(
            "the request body is larger than the limit of {max_body} bytes (length limit exceeded)"
        ))
        .with_status(axum::http::StatusCode::PAYLOAD_TOO_LARGE)
        .into_response();
    }
    next.run(request).await
}

/// One line per request on stderr: id, method, path, status, tokens,
/// time. A stream's line comes when it ends (see `routes::RequestLog`); a
/// client that leaves before its response gets `status=499` (nginx's code
/// for it).
async fn log_request(mut request: Request, next: Next) -> Response {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let log = RequestLog {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
        start: Instant::now(),
    };
    request.extensions_mut().insert(log.clone());
    // Logs if the client leaves while its request is being answered.
    struct Left(Option<RequestLog>);
    impl Drop for Left {
        fn drop(&mut self) {
            if let Some(log) = self.0.take() {
                log.line(499, "");
            }
        }
    }
    let mut left = Left(Some(log.clone()));
    let response = next.run(request).await;
    left.0 = None;
    if response.extensions().get::<Streaming>().is_none() {
        let tokens = response
            .extensions()
            .get::<Served>()
            .map(|s| {
                format!(
                    " prompt_tokens={} completion_tokens={}",
                    s.prompt, s.completion
                )
            })
            .unwrap_or_default();
        log.line(response.status().as_u16(), &tokens);
    }
    response
}
