//! The chat page at `/` (issue 16): one HTML page, its script and its
//! style, embedded in the binary (no CDN, no network at run time). The
//! page talks to this server's own `/v1/chat/completions`.
//!
//! A strict Content-Security-Policy goes with each file: no script but
//! `/chat.js`, no style but `/chat.css`, no connection but to this origin.
//! The page already renders model text only as text nodes; the policy
//! makes sure nothing a model writes could run even if that failed.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const PAGE: &str = include_str!("web/index.html");
const SCRIPT: &str = include_str!("web/chat.js");
const STYLE: &str = include_str!("web/chat.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `/`, `/chat.js` and `/chat.css`, open to all (the page asks for the
/// API key itself).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(page))
        .route("/chat.js", get(script))
        .route("/chat.css", get(style))
}

async fn page() -> Response {
    file("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    file("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE)
}
