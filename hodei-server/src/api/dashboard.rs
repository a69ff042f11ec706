//! The web dashboard: plain HTML, CSS and JavaScript modules, embedded in the binary and
//! served at `/` on the operator API's listener. It needs no network but the control plane's,
//! and talks to the API like any client (the session cookie and the CSRF header).

use axum::extract::Path;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = "text/javascript; charset=utf-8";

/// What `/assets/{file}` serves: (file, content type, body).
const ASSETS: [(&str, &str, &str); 4] = [
    ("app.js", SCRIPT, include_str!("dashboard/app.js")),
    ("dom.js", SCRIPT, include_str!("dashboard/dom.js")),
    ("payload_form.js", SCRIPT, include_str!("dashboard/payload_form.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("dashboard/style.css")),
];

/// Only this origin's own files, no inline script or style, no framing: whatever a run holds
/// cannot run in the page, even if it ended up in it as markup.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self' blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, content_type),
            (HeaderName::from_static("content-security-policy"), CONTENT_SECURITY_POLICY),
            (HeaderName::from_static("x-content-type-options"), "nosniff"),
            (HeaderName::from_static("x-frame-options"), "DENY"),
            (HeaderName::from_static("referrer-policy"), "no-referrer"),
            // Embedded in the binary: a new build serves new files at the same paths.
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub(crate) async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

pub(crate) async fn asset_file(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, ..)| *name == file) {
        Some((_, content_type, body)) => asset(content_type, body).into_response(),
        None => ApiError::not_found(format!("no asset named `{file}`")).into_response(),
    }
}
