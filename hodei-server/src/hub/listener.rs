//! The hub's listeners: TCP accepted and TLS-terminated here, so that only the PKI's rustls
//! configurations (and their verifiers) ever apply, then served by tonic until shut down.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;

use super::config::HubConfig;
use super::error::HubError;
use super::handle::Hub;
use super::registration::RegistrationService;
use super::session::SessionService;
use crate::pki::PkiError;
use hodei_agent::pki::TlsIdentity;
use hodei_agent::protocol::v1::control_plane_server::{ControlPlane, ControlPlaneServer};

/// The HTTP/2 flow-control windows of the hub's connections, per stream and per connection
/// (see [`serve`]): twice the held output an agent may have, within HTTP/2's limit.
fn h2_window(config: &HubConfig) -> u32 {
    u32::try_from(config.max_held_bytes.saturating_mul(2)).unwrap_or(MAX_H2_WINDOW).min(MAX_H2_WINDOW)
}
/// HTTP/2's largest flow-control window.
const MAX_H2_WINDOW: u32 = (1 << 31) - 1;
/// The largest HTTP/2 frame the hub accepts.
const H2_MAX_FRAME: u32 = 256 * 1024;

impl Hub {
    /// Serves `Register` on `listener`, over TLS with `identity` and no client certificate.
    pub fn serve_registration(
        &self,
        listener: TcpListener,
        identity: &TlsIdentity,
    ) -> Result<Listening, HubError> {
        let service = RegistrationService { pki: self.pki.clone() };
        let tls = self.pki.registration_server_config(identity);
        serve(
            "registration",
            listener,
            tls,
            ControlPlaneServer::new(service),
            h2_window(&self.config),
            watch::channel(false),
        )
    }

    /// Serves `Session` on `listener`, over mutual TLS with `identity`: a client certificate
    /// from the PKI's CA, valid and not revoked, is required.
    pub fn serve_sessions(
        &self,
        listener: TcpListener,
        identity: &TlsIdentity,
    ) -> Result<Listening, HubError> {
        let (shutdown, stopped) = watch::channel(false);
        // Sessions see the shutdown too: a graceful stop waits for open streams, and these only
        // end when the agent goes.
        let (service, sessions_ended) = self.session_service(stopped.clone());
        if let Some(logs) = self.logs.as_ref().filter(|logs| logs.is_shared()) {
            tokio::spawn(super::cancels::forward_cancels(
                Arc::downgrade(&self.registry),
                Arc::downgrade(logs),
                stopped.clone(),
            ));
        }
        let tls = self.pki.mtls_server_config(identity);
        let server = ControlPlaneServer::new(service).max_decoding_message_size(self.max_session_message());
        let mut listening =
            serve("session", listener, tls, server, h2_window(&self.config), (shutdown, stopped))?;
        listening.sessions_ended = Some(sessions_ended);
        Ok(listening)
    }

    /// What serves `Session`, ending its sessions once `stopped` says so, and what says when
    /// every session task it started has ended: its `recv` returns `None` once the service and
    /// those tasks are gone (nothing is ever sent on it).
    pub(super) fn session_service(
        &self,
        stopped: watch::Receiver<bool>,
    ) -> (SessionService, mpsc::Receiver<()>) {
        let (alive, ended) = mpsc::channel(1);
        let service = SessionService {
            config: self.config.clone(),
            registry: self.registry.clone(),
            logs: self.logs.clone(),
            pki: self.pki.clone(),
            metrics: self.metrics.clone(),
            stopped,
            alive,
        };
        (service, ended)
    }

    /// The largest message a session decodes ([`HubConfig::max_session_message`]).
    pub(super) fn max_session_message(&self) -> usize {
        self.config.max_session_message()
    }
}

/// A running listener. Dropping it stops the server too, without waiting.
#[derive(Debug)]
pub struct Listening {
    listener: &'static str,
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// For the session listener: closed once every session task has ended, and with it
    /// released the log store (whose directory lock a control plane started next needs).
    sessions_ended: Option<mpsc::Receiver<()>>,
}

impl Listening {
    /// The address it listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, ends open sessions, and waits for the server and the sessions' tasks
    /// to finish: each makes what it wrote durable and lets go of the log store.
    pub async fn shutdown(mut self) -> Result<(), HubError> {
        let listener = self.listener;
        self.shutdown.send_replace(true);
        let Some(task) = self.task.take() else { return Ok(()) };
        let served = task
            .await
            .map_err(|source| HubError::Task { listener, source })?
            .map_err(|source| HubError::Transport { listener, source });
        if let Some(mut ended) = self.sessions_ended.take() {
            while ended.recv().await.is_some() {}
        }
        served
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// Runs `service` on connections accepted from `listener` and TLS-terminated with `tls`, until
/// `shutdown` says so.
fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Result<Arc<ServerConfig>, PkiError>,
    service: ControlPlaneServer<impl ControlPlane>,
    h2_window: u32,
    (shutdown, stopped): (watch::Sender<bool>, watch::Receiver<bool>),
) -> Result<Listening, HubError> {
    let acceptor = TlsAcceptor::from(tls.map_err(|source| HubError::Tls { listener: name, source })?);
    let local_addr = listener.local_addr().map_err(|source| HubError::Io { listener: name, source })?;
    let (connections, incoming) = mpsc::channel::<io::Result<TlsStream<TcpStream>>>(16);
    tokio::spawn(accept(listener, acceptor, connections, stopped.clone()));
    let mut stop = stopped;
    // The agent streams logs to the hub: hyper's 1 MiB windows would let it send one batch and
    // then wait for the hub to read it. With windows above the agent's own limit of
    // unacknowledged output, flow control never holds it back before that limit does, and the
    // hub's memory per session stays bounded by them. Frames larger than HTTP/2's 16 KiB
    // default cut the per-frame work of a batch sixteenfold.
    let mut server = Server::builder()
        .initial_stream_window_size(h2_window)
        .initial_connection_window_size(h2_window)
        .max_frame_size(H2_MAX_FRAME);
    let task = tokio::spawn(server.add_service(service).serve_with_incoming_shutdown(
        ReceiverStream::new(incoming),
        async move {
            // An error means the sender is gone, which is a shutdown too.
            let _ = stop.wait_for(|stopped| *stopped).await;
        },
    ));
    Ok(Listening { listener: name, local_addr, shutdown, task: Some(task), sessions_ended: None })
}

/// Accepts TCP connections and hands over those whose TLS handshake succeeds.
async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    connections: mpsc::Sender<io::Result<TlsStream<TcpStream>>>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            _ = stopped.wait_for(|stopped| *stopped) => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Per-connection errors (e.g. the peer reset before accept); the listener lives on.
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let connections = connections.clone();
        // One handshake per task, so that a slow or silent client does not hold up the others.
        // As on the agent's side: small latency-bound messages must not wait for Nagle.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        tokio::spawn(async move {
            let peer = tcp.peer_addr().ok();
            match acceptor.accept(tcp).await {
                Ok(tls) => {
                    // A closed channel means the server stopped; the connection is dropped.
                    let _ = connections.send(Ok(tls)).await;
                }
                // A refused client certificate ends here, never reaching the service.
                Err(e) => tracing::info!(?peer, error = %e, "TLS handshake refused"),
            }
        });
    }
}
