//! The agent's side of the connection: registering with a one-time token, and opening the session.
//!
//! The agent dials the hub (inside-out: the worker opens no port) through its own rustls
//! connector, built by [`agent_client_config`], so that it trusts only the provisioned CA and not
//! the system's roots.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::pki::{AgentKey, PkiError, TlsIdentity, WorkerCertificate, agent_client_config};
use crate::protocol::v1::control_plane_client::ControlPlaneClient;
use crate::protocol::v1::{
    AgentMessage, Hello, HubMessage, RegisterRequest, Welcome, agent_message, hub_message,
};
use crate::protocol::{PROTOCOL, VersionMismatch, negotiate};

/// What can go wrong while registering or opening a session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The key, CSR, certificate or TLS configuration could not be made or read.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The connection to the hub could not be made (TCP, TLS or HTTP/2).
    #[error("could not connect to the control plane at {addr}: {source}")]
    Transport {
        /// The hub's address.
        addr: SocketAddr,
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The hub refused the call or ended the stream with an error.
    #[error("the control plane refused: {0}")]
    Refused(#[from] tonic::Status),
    /// The hub answered with a protocol version this agent cannot speak.
    #[error(transparent)]
    Version(#[from] VersionMismatch),
    /// The hub answered something else than the protocol prescribes.
    #[error("protocol violation by the control plane: {0}")]
    Protocol(&'static str),
    /// The certificate the hub issued is for another worker.
    #[error("the control plane issued a certificate for worker `{issued}` instead of `{asked}`")]
    WrongCertificate {
        /// The worker id asked for.
        asked: String,
        /// The one in the certificate.
        issued: String,
    },
}

/// An open session: the hub's `Welcome`, and both directions of the stream. Dropping `sender`
/// closes the agent's side; the hub then ends the session.
#[derive(Debug)]
#[non_exhaustive]
pub struct Session {
    /// The hub's first message: the negotiated version and the session parameters.
    pub welcome: Welcome,
    /// Messages to the hub.
    pub sender: mpsc::Sender<AgentMessage>,
    /// Messages from the hub, after the `Welcome`.
    pub receiver: Streaming<HubMessage>,
}

/// A gRPC channel to `addr` over TLS with `tls`. The server name checked is `addr`'s IP address,
/// which the hub's server certificate must name.
pub async fn channel(addr: SocketAddr, tls: Arc<ClientConfig>) -> Result<Channel, ConnectError> {
    let transport = |source| ConnectError::Transport { addr, source };
    let connector = TlsConnector::from(tls);
    let server_name = ServerName::IpAddress(addr.ip().into());
    // The scheme is `http` because TLS is done by the connector below, not by tonic.
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(transport)?;
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                // gRPC messages are small and latency-bound (an ack, an assignment): Nagle's
                // algorithm against delayed ACKs cost ~40 ms per exchange.
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(transport)
}

/// Registers `worker_id` with a one-time `token` at the hub's registration listener `addr`,
/// trusting only `ca_bundle_pem`. Returns the agent's new key, which never left this process,
/// and the certificate the hub issued for it.
pub async fn register(
    addr: SocketAddr,
    ca_bundle_pem: &str,
    worker_id: &str,
    token: &str,
) -> Result<(AgentKey, WorkerCertificate), ConnectError> {
    let key = AgentKey::generate()?;
    let csr_pem = key.csr_pem(worker_id)?;
    let mut client = ControlPlaneClient::new(channel(addr, agent_client_config(ca_bundle_pem, None)?).await?);
    let response = client
        .register(RegisterRequest {
            protocol: Some(PROTOCOL),
            worker_id: worker_id.to_owned(),
            token: token.to_owned(),
            csr_pem,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            labels: Default::default(),
        })
        .await?
        .into_inner();
    negotiate(PROTOCOL, response.protocol)?;
    let certificate = WorkerCertificate::from_pem(&response.certificate_pem)?;
    if certificate.worker_id != worker_id {
        return Err(ConnectError::WrongCertificate {
            asked: worker_id.to_owned(),
            issued: certificate.worker_id,
        });
    }
    Ok((key, certificate))
}

/// The `Hello` of this agent as `worker_id`, with no jobs to re-attach.
pub fn hello(worker_id: &str) -> Hello {
    Hello {
        protocol: Some(PROTOCOL),
        worker_id: worker_id.to_owned(),
        jobs: Vec::new(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        max_held_bytes: crate::agent::MAX_HELD_BYTES as u64,
    }
}

/// Opens a session at the hub's session listener `addr`, presenting `identity`, as `worker_id`.
pub async fn open_session(
    addr: SocketAddr,
    ca_bundle_pem: &str,
    identity: &TlsIdentity,
    worker_id: &str,
) -> Result<Session, ConnectError> {
    let channel = channel(addr, agent_client_config(ca_bundle_pem, Some(identity))?).await?;
    start_session(channel, hello(worker_id)).await
}

/// Sends `hello` on a new session over `channel` and waits for the hub's `Welcome`.
pub async fn start_session(channel: Channel, hello: Hello) -> Result<Session, ConnectError> {
    let (sender, outbound) = mpsc::channel(16);
    // The channel is new and empty, so this cannot find it full.
    sender
        .try_send(AgentMessage { kind: Some(agent_message::Kind::Hello(hello)) })
        .map_err(|_| ConnectError::Protocol("the session closed before Hello was sent"))?;
    let mut receiver =
        ControlPlaneClient::new(channel).session(ReceiverStream::new(outbound)).await?.into_inner();
    let welcome = match receiver.message().await?.and_then(|m| m.kind) {
        Some(hub_message::Kind::Welcome(welcome)) => welcome,
        Some(_) => return Err(ConnectError::Protocol("the first message of a session was not Welcome")),
        None => return Err(ConnectError::Protocol("the session ended before Welcome")),
    };
    negotiate(PROTOCOL, welcome.protocol)?;
    Ok(Session { welcome, sender, receiver })
}
