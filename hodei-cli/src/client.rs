//! The HTTP side: requests to the operator API, its error bodies, and its event streams.

use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_DISPOSITION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::Value;
use tokio::time::Instant;

use crate::error::{CliError, Result};
use crate::settings::Settings;
use crate::sse::{SseEvent, SseParser};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// For plain requests; streams have none, they have [`STALL_TIMEOUT`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The server sends a keep-alive every 15 s: three missed mean the connection is dead even if
/// the OS has not noticed yet.
const STALL_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    auth: Option<HeaderValue>,
}

impl Client {
    pub fn new(settings: &Settings) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("hodei-cli/", env!("CARGO_PKG_VERSION")))
            // Loading the system's roots is most of a plain-HTTP command's start-up; only
            // HTTPS needs them.
            .tls_built_in_root_certs(settings.addr.scheme() == "https");
        if let Some(path) = &settings.ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                CliError::usage(format!("cannot read the CA certificate {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                CliError::usage(format!("the CA certificate {} is not PEM: {e}", path.display()))
            })?;
            if certs.is_empty() {
                return Err(CliError::usage(format!("no certificate in {}", path.display())));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| CliError::new("tls", format!("cannot set up HTTPS: {e}")))?;
        let auth = match &settings.token {
            Some(token) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| CliError::usage("the token is not a valid header value"))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Self { http, base: settings.addr.clone(), auth })
    }

    /// `<addr>/api/v1/<segments...>`, each segment percent-encoded whole: job ids hold `/` and
    /// `#`, which must reach the server as part of the segment.
    pub fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        {
            // Cannot fail: the address was checked to be http(s) with a host.
            if let Ok(mut path) = url.path_segments_mut() {
                path.pop_if_empty().extend(["api", "v1"]).extend(segments);
            }
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        url
    }

    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let mut request = self.http.request(method, url);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        request
    }

    /// Sends and returns the JSON body (`Value::Null` for an empty one), or the API's error.
    pub async fn call(&self, method: Method, url: Url, body: Option<&Value>) -> Result<Value> {
        let mut request = self.request(method, url);
        if let Some(body) = body {
            request = request.json(body);
        }
        json_answer(request).await
    }

    /// Posts `bytes` as `application/octet-stream` (a journal file) and returns the JSON answer.
    pub async fn post_bytes(&self, segments: &[&str], bytes: Vec<u8>) -> Result<Value> {
        let request = self
            .request(Method::POST, self.url(segments, &[]))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(bytes);
        json_answer(request).await
    }

    /// `GET`s a file: its bytes, and the name the server gave it, if that is a plain file name.
    pub async fn download(&self, segments: &[&str]) -> Result<Download> {
        let request = self.request(Method::GET, self.url(segments, &[])).timeout(REQUEST_TIMEOUT);
        let response = check(request.send().await.map_err(transport)?).await?;
        let file_name = response
            .headers()
            .get(CONTENT_DISPOSITION)
            .and_then(|value| value.to_str().ok())
            .and_then(attachment_name);
        let bytes = response.bytes().await.map_err(transport)?.to_vec();
        Ok(Download { bytes, file_name })
    }

    pub async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Value> {
        self.call(Method::GET, self.url(segments, query), None).await
    }

    pub async fn post(&self, segments: &[&str], body: &Value) -> Result<Value> {
        self.call(Method::POST, self.url(segments, &[]), Some(body)).await
    }

    /// Opens a server-sent event stream; `last_id` resumes it where a dropped one stopped.
    pub async fn stream(&self, url: Url, last_id: Option<&str>) -> Result<SseConnection> {
        let mut request = self.request(Method::GET, url).header(ACCEPT, "text/event-stream");
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.map_err(transport)?;
        let response = check(response).await?;
        Ok(SseConnection { response, parser: SseParser::new(), ready: Default::default() })
    }
}

/// A file the API answered with.
#[derive(Debug)]
pub struct Download {
    pub bytes: Vec<u8>,
    /// The `filename` of its `Content-Disposition`, when that names a file and nothing else.
    pub file_name: Option<String>,
}

/// Sends `request` for a JSON answer and returns it (`Value::Null` for an empty one), or the
/// API's error.
async fn json_answer(request: RequestBuilder) -> Result<Value> {
    let request = request.timeout(REQUEST_TIMEOUT).header(ACCEPT, "application/json");
    let response = check(request.send().await.map_err(transport)?).await?;
    let bytes = response.bytes().await.map_err(transport)?;
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| CliError::new("invalid_response", format!("the server's answer is not JSON: {e}")))
}

/// The `filename` of a `Content-Disposition` value, if it is a plain file name: the CLI writes
/// to it in the current directory, so a name with a directory in it (`../x`, `/etc/x`), from a
/// server or anything between, is never used.
fn attachment_name(disposition: &str) -> Option<String> {
    let name = disposition.split(';').find_map(|part| part.trim().strip_prefix("filename="))?;
    let name = name.strip_prefix('"').and_then(|n| n.strip_suffix('"')).unwrap_or(name);
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control);
    plain.then(|| name.to_owned())
}

/// What a stream gave next.
#[derive(Debug)]
pub enum Next {
    Event(SseEvent),
    /// The server closed the stream cleanly.
    End,
}

#[derive(Debug)]
pub struct SseConnection {
    response: Response,
    parser: SseParser,
    ready: std::collections::VecDeque<SseEvent>,
}

impl SseConnection {
    /// The next event; an error means the connection dropped (a reconnect may resume it).
    pub async fn next(&mut self) -> Result<Next> {
        self.next_within(None).await.map(|next| next.unwrap_or(Next::End))
    }

    /// Like [`next`](Self::next), or `Ok(None)` once `idle` passes without an event (the
    /// connection stays usable).
    pub async fn next_within(&mut self, idle: Option<Duration>) -> Result<Option<Next>> {
        let idle_deadline = idle.map(|idle| Instant::now() + idle);
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(Next::Event(event)));
            }
            let stall = Instant::now() + STALL_TIMEOUT;
            let deadline = idle_deadline.map_or(stall, |idle| idle.min(stall));
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.ready.extend(self.parser.feed(&bytes)),
                Ok(Ok(None)) => return Ok(Some(Next::End)),
                Ok(Err(e)) => return Err(transport(e)),
                Err(_) if Some(deadline) == idle_deadline => return Ok(None),
                Err(_) => {
                    return Err(CliError::connection("the event stream stalled (no keep-alive for 45s)"));
                }
            }
        }
    }
}

/// Turns an HTTP error answer into the API's error, read from its body when it has one.
async fn check(response: Response) -> Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let bytes = response.bytes().await.unwrap_or_default();
    Err(api_error(status, &bytes))
}

pub fn api_error(status: StatusCode, body: &[u8]) -> CliError {
    let parsed: Option<(String, String)> = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let error = v.get("error")?;
        Some((error.get("code")?.as_str()?.to_owned(), error.get("message")?.as_str()?.to_owned()))
    });
    match parsed {
        Some((code, message)) => CliError::api(status.as_u16(), code, message),
        // Not our error body: a proxy, or another server at this address.
        None => CliError::api(
            status.as_u16(),
            format!("http_{}", status.as_u16()),
            format!("the server answered {status} without an API error"),
        ),
    }
}

fn transport(error: reqwest::Error) -> CliError {
    // reqwest's own message is generic ("error sending request"); what people need (refused,
    // DNS, a certificate) is the innermost cause.
    let mut cause: &dyn std::error::Error = &error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    let what = match error.url() {
        Some(url) => {
            let mut url = url.clone();
            url.set_query(None);
            url.to_string()
        }
        None => "the server".to_owned(),
    };
    let doing = if error.is_connect() {
        "cannot connect to"
    } else if error.is_timeout() {
        "timed out waiting for"
    } else {
        "lost the connection to"
    };
    CliError::connection(format!("{doing} {what}: {cause}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::parse_addr;

    fn client(addr: &str) -> Client {
        Client::new(&Settings {
            addr: parse_addr(addr).unwrap(),
            token: Some("hodei_x".into()),
            ca_cert: None,
        })
        .unwrap()
    }

    #[test]
    fn path_segments_are_encoded_whole() {
        let client = client("http://127.0.0.1:7433");
        let url = client.url(&["jobs", "run-1/2#1", "logs", "stdout"], &[("follow", "true".into())]);
        assert_eq!(url.as_str(), "http://127.0.0.1:7433/api/v1/jobs/run-1%2F2%231/logs/stdout?follow=true");
        let proxied = client_with_prefix();
        assert_eq!(proxied.url(&["runs", "a b"], &[]).as_str(), "https://p.example/hodei/api/v1/runs/a%20b");
    }

    fn client_with_prefix() -> Client {
        client("https://p.example/hodei/")
    }

    #[test]
    fn only_a_plain_file_name_is_taken_from_the_server() {
        assert_eq!(attachment_name("attachment; filename=\"ci-8.journal\"").as_deref(), Some("ci-8.journal"));
        assert_eq!(attachment_name("attachment; filename=a%2Fb.journal").as_deref(), Some("a%2Fb.journal"));
        for refused in [
            "attachment",
            "attachment; filename=\"\"",
            "attachment; filename=\"../x.journal\"",
            "attachment; filename=\"/etc/x.journal\"",
            "attachment; filename=\"a\\b.journal\"",
            "attachment; filename=\"..\"",
        ] {
            assert_eq!(attachment_name(refused), None, "{refused}");
        }
    }

    #[test]
    fn error_bodies_become_api_errors() {
        let body =
            br#"{"error":{"code":"forbidden","message":"token `v` is a viewer token; this needs operator"}}"#;
        let error = api_error(StatusCode::FORBIDDEN, body);
        assert_eq!(error.code, "forbidden");
        assert_eq!(error.exit_code(), crate::error::exit::NOT_ALLOWED);
        let error = api_error(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(error.to_string(), "the server answered 502 Bad Gateway without an API error (http_502)");
    }
}
