//! Serving the operator API: its state, its routes and its listener.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::serve::ListenerExt;
use axum::{Router, middleware};
use hodei_agent::pki::{TlsIdentity, crypto_provider};
use hodei_core::Engine;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::error::ApiError;
use super::metrics::{MetricsAccess, Scrapers};
use super::openapi::openapi_json;
use super::tokens::{ADMIN_TOKEN_FILE, API_DIR, TokenError, TokenStore};
use super::webhooks::Webhook;
use super::{admin, dashboard, logs, metrics, replay, requests, runs, webhooks, workers};
use crate::control_plane::ControlPlane;
use crate::hub::Hub;
use crate::logstore::LogStore;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::scheduler::Scheduler;

/// The address the API binds unless told otherwise: loopback only.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7433);
/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// How long a TLS client gets to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) engine: Engine,
    pub(crate) tokens: Arc<TokenStore>,
    pub(crate) hub: Option<Hub>,
    pub(crate) logs: Option<Arc<LogStore>>,
    pub(crate) scheduler: Option<Scheduler>,
    pub(crate) webhooks: Arc<BTreeMap<String, Webhook>>,
    /// Served over TLS: the session cookie is `Secure`.
    pub(crate) secure_cookies: bool,
    /// What `/metrics` serves, if anything, and to whom.
    pub(crate) metrics: Option<Metrics>,
    pub(crate) scrapers: Arc<Scrapers>,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiServeError {
    /// A non-loopback address without TLS: tokens would cross the network in clear text.
    #[error(
        "refusing to serve the operator API on {0} without TLS: bearer tokens would cross the network in clear text; bind 127.0.0.1, or give a certificate (ApiServerBuilder::tls)"
    )]
    NeedsTls(SocketAddr),
    /// The address could not be bound.
    #[error("cannot bind the operator API to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The certificate or key given for TLS is unusable.
    #[error("the operator API's TLS certificate: {0}")]
    Tls(String),
    /// The token store could not be opened.
    #[error("the operator API's token store: {0}")]
    Tokens(#[from] TokenError),
    /// Metrics open to anyone ([`MetricsAccess::Open`]) on an address other machines reach.
    #[error(
        "refusing to serve /metrics without a token on {0}: open metrics are for loopback; give a scrape token (MetricsAccess::ScrapeToken)"
    )]
    OpenMetrics(SocketAddr),
}

/// A TLS configuration for [`ApiServerBuilder::tls`] from a certificate chain (PEM, leaf
/// first) and its private key (PEM): rustls on ring, HTTP/1.1, the workspace's protocol
/// versions.
pub fn tls_config(chain_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, ApiServeError> {
    let identity =
        TlsIdentity::from_pem(chain_pem, key_pem).map_err(|e| ApiServeError::Tls(e.to_string()))?;
    tls_config_for(&identity)
}

fn tls_config_for(identity: &TlsIdentity) -> Result<Arc<rustls::ServerConfig>, ApiServeError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ApiServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain().to_vec(), identity.key().clone_key())
        .map_err(|e| ApiServeError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Builds an [`ApiServer`]. See [`ApiServer::builder`].
#[derive(Debug)]
pub struct ApiServerBuilder {
    engine: Engine,
    data_dir: PathBuf,
    addr: SocketAddr,
    hub: Option<Hub>,
    logs: Option<Arc<LogStore>>,
    scheduler: Option<Scheduler>,
    tls: Option<Arc<rustls::ServerConfig>>,
    webhooks: BTreeMap<String, Webhook>,
    metrics: Option<Metrics>,
    metrics_access: MetricsAccess,
    #[cfg(feature = "postgres")]
    shared_tokens: Option<Arc<hodei_core::PostgresStore>>,
}

impl ApiServerBuilder {
    /// Keeps the API's tokens in the database of `store`, shared by every engine's API on it
    /// ([`TokenStore::open_shared`]), instead of in the data directory: an operator's token
    /// works on every engine, and a revocation holds on all of them.
    #[cfg(feature = "postgres")]
    pub fn shared_tokens(mut self, store: Arc<hodei_core::PostgresStore>) -> Self {
        self.shared_tokens = Some(store);
        self
    }

    /// Serves the control plane's workers and job logs too.
    pub fn control_plane(mut self, control_plane: &ControlPlane) -> Self {
        self.hub = Some(control_plane.hub().clone());
        self.logs = Some(control_plane.logs().clone());
        self.scheduler = Some(control_plane.scheduler().clone());
        self
    }

    /// Serves the job logs of this store (what [`control_plane`](Self::control_plane) does
    /// with the control plane's), for a control plane assembled by hand.
    pub fn logs(mut self, logs: Arc<LogStore>) -> Self {
        self.logs = Some(logs);
        self
    }

    /// Where to listen; [`DEFAULT_ADDR`] unless set. Port 0 picks a free port. A non-loopback
    /// address needs [`tls`](Self::tls).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Serves over TLS with this configuration (a certificate of the user's own, or one issued
    /// by the embedded CA).
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Serves over TLS with a certificate for `names` (IP addresses or DNS names) issued by the
    /// control plane's embedded CA, the one its workers already trust: clients trust
    /// `<data>/pki/ca.cert.pem` (`hodei --ca-cert`). Needs
    /// [`control_plane`](Self::control_plane) first.
    pub fn tls_from_embedded_ca(mut self, names: &[&str]) -> Result<Self, ApiServeError> {
        let hub = self.hub.as_ref().ok_or_else(|| {
            ApiServeError::Tls("no embedded CA: give the control plane first (control_plane)".into())
        })?;
        let identity =
            hub.pki().issue_server_identity(names).map_err(|e| ApiServeError::Tls(e.to_string()))?;
        self.tls = Some(tls_config_for(&identity)?);
        Ok(self)
    }

    /// Starts a run for each `POST /api/v1/hooks/{name}`; see [`Webhook`].
    pub fn webhook(mut self, name: impl Into<String>, webhook: Webhook) -> Self {
        self.webhooks.insert(name.into(), webhook);
        self
    }

    /// Serves `metrics` at `/metrics`, in Prometheus' text format, and counts the API's requests
    /// there. Who may read them: [`metrics_access`](Self::metrics_access). Without it,
    /// `/metrics` answers 404.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Who may read `/metrics`: by default any of the API's tokens.
    pub fn metrics_access(mut self, access: MetricsAccess) -> Self {
        self.metrics_access = access;
        self
    }

    /// Opens the token store (issuing the first admin token on the first start), binds and
    /// serves until [`ApiServer::shutdown`].
    pub async fn serve(self) -> Result<ApiServer, ApiServeError> {
        if !self.addr.ip().is_loopback() && self.tls.is_none() {
            return Err(ApiServeError::NeedsTls(self.addr));
        }
        if matches!(self.metrics_access, MetricsAccess::Open) && !self.addr.ip().is_loopback() {
            return Err(ApiServeError::OpenMetrics(self.addr));
        }
        #[cfg(feature = "postgres")]
        let (tokens, first_admin) = match self.shared_tokens.clone() {
            // It blocks on the database.
            Some(store) => {
                let data_dir = self.data_dir.clone();
                tokio::task::spawn_blocking(move || TokenStore::open_shared(store, &data_dir))
                    .await
                    .map_err(|e| TokenError::Shared { action: "open the tokens", reason: e.to_string() })??
            }
            None => TokenStore::open(&self.data_dir)?,
        };
        #[cfg(not(feature = "postgres"))]
        let (tokens, first_admin) = TokenStore::open(&self.data_dir)?;
        let admin_token_file = first_admin.map(|_| self.data_dir.join(API_DIR).join(ADMIN_TOKEN_FILE));
        let state = ApiState {
            engine: self.engine,
            tokens: Arc::new(tokens),
            hub: self.hub,
            logs: self.logs,
            scheduler: self.scheduler,
            webhooks: Arc::new(self.webhooks),
            secure_cookies: self.tls.is_some(),
            scrapers: Arc::new(Scrapers::from(&self.metrics_access)),
            metrics: self.metrics,
        };
        let listener = TcpListener::bind(self.addr)
            .await
            .map_err(|source| ApiServeError::Bind { addr: self.addr, source })?;
        let local_addr =
            listener.local_addr().map_err(|source| ApiServeError::Bind { addr: self.addr, source })?;
        let app = router(state);
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = match self.tls {
            None => tokio::spawn(async move {
                // Responses are small and a stream's events smaller: without NODELAY, Nagle's
                // algorithm and the client's delayed ACK hold each one back for up to 40 ms.
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
            }),
            Some(config) => {
                let listener = TlsListener::spawn(listener, TlsAcceptor::from(config), local_addr);
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
                })
            }
        };
        tracing::info!(addr = %local_addr, "operator API listening");
        Ok(ApiServer { local_addr, admin_token_file, stop: Some(stop), task })
    }
}

/// The operator API, served by the control plane in the user's own process: runs, their
/// journals and logs, the operator verbs, workers, tokens and webhooks, as HTTP/JSON with
/// server-sent events for what follows. Its OpenAPI document is at `/api/v1/openapi.json`.
///
/// Every endpoint but `/api/v1/health` and the document needs a bearer token (see
/// [`TokenStore`]); the first start writes an admin token to `<data>/api/admin-token`.
#[derive(Debug)]
pub struct ApiServer {
    local_addr: SocketAddr,
    admin_token_file: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl ApiServer {
    /// An API over `engine`, keeping its tokens in `data_dir`. It works without workers; add
    /// [`control_plane`](ApiServerBuilder::control_plane) for workers and logs.
    pub fn builder(engine: Engine, data_dir: impl AsRef<Path>) -> ApiServerBuilder {
        ApiServerBuilder {
            engine,
            data_dir: data_dir.as_ref().to_path_buf(),
            addr: DEFAULT_ADDR,
            hub: None,
            logs: None,
            scheduler: None,
            tls: None,
            webhooks: BTreeMap::new(),
            metrics: None,
            metrics_access: MetricsAccess::default(),
            #[cfg(feature = "postgres")]
            shared_tokens: None,
        }
    }

    /// An API over a node's engine and control plane, with its tokens in the node's directory,
    /// serving the node's [`metrics`](crate::NodeBuilder::metrics) if it has them.
    pub fn for_node(node: &Node) -> ApiServerBuilder {
        let builder =
            Self::builder(node.engine().clone(), node.data_dir()).control_plane(node.control_plane());
        match node.metrics() {
            Some(metrics) => builder.metrics(metrics.clone()),
            None => builder,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the first admin token was written, when this start issued it.
    pub fn admin_token_file(&self) -> Option<&Path> {
        self.admin_token_file.as_deref()
    }

    /// Stops accepting, lets requests in flight finish (followers are cut), and returns.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Server-sent event streams never end on their own; a bounded grace, then they go.
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

fn router(state: ApiState) -> Router {
    let routes = Router::new()
        .route("/", get(dashboard::index))
        .route("/assets/{file}", get(dashboard::asset_file))
        .route("/api/v1/health", get(admin::health))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/session", get(admin::whoami).post(admin::login).delete(admin::logout))
        .route("/api/v1/definitions", get(admin::definitions))
        .route("/api/v1/runs", get(runs::list).post(runs::start))
        .route("/api/v1/runs/{id}", get(runs::get))
        .route("/api/v1/runs/{id}/events", get(runs::events))
        .route("/api/v1/runs/{id}/journal", get(replay::journal))
        .route("/api/v1/runs/{id}/replay", get(replay::check_run))
        .route("/api/v1/runs/{id}/signals", post(runs::signal))
        .route("/api/v1/runs/{id}/cancel", post(runs::cancel))
        .route("/api/v1/runs/{id}/fork", post(runs::fork))
        .route("/api/v1/runs/{id}/pause", post(runs::pause))
        .route("/api/v1/runs/{id}/resume", post(runs::resume))
        .route("/api/v1/runs/{id}/retry", post(runs::retry_now))
        .route("/api/v1/runs/{id}/retry-compensation", post(runs::retry_compensation))
        .route("/api/v1/replay", post(replay::check_journal))
        .route("/api/v1/check", get(replay::check_in_flight))
        .route("/api/v1/jobs/{job}/logs/{stream}", get(logs::read))
        .route("/api/v1/workers", get(workers::list))
        .route("/api/v1/metrics", get(workers::metrics))
        .route("/api/v1/workers/{id}", delete(workers::remove))
        .route("/api/v1/workers/{id}/drain", post(workers::drain))
        .route("/api/v1/tokens", get(admin::list_tokens).post(admin::issue_token))
        .route("/api/v1/tokens/{name}", delete(admin::revoke_token))
        .route("/api/v1/hooks/{name}", post(webhooks::trigger))
        .route("/metrics", get(metrics::scrape))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed here",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    // Outermost, so that it sees every answer, refusals of the body cap included.
    let routes = match state.metrics.clone() {
        Some(metrics) => routes.layer(middleware::from_fn_with_state(metrics, requests::count)),
        None => routes,
    };
    routes.with_state(state)
}

/// Accepted TLS connections: handshakes run in their own tasks, so a slow or silent client
/// never holds up the others.
struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
}

impl TlsListener {
    fn spawn(listener: TcpListener, acceptor: TlsAcceptor, local_addr: SocketAddr) -> Self {
        let (tx, accepted) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::debug!(%error, "operator API accept failed");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, handshaken) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = handshaken.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "operator API TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "operator API TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Self { accepted, local_addr }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends once this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
