//! What the fuzz targets in `fuzz/` reach of the hub: a session and a registration served as
//! the listeners serve them, past the TLS that only sits in front of them.

use tokio::sync::watch;
use tonic::{Request, Status, Streaming};

use super::handle::Hub;
use super::registration::RegistrationService;
use hodei_agent::protocol::v1::control_plane_server::ControlPlane;
use hodei_agent::protocol::v1::{AgentMessage, HubMessage, RegisterRequest, RegisterResponse};

/// The largest message `hub`'s sessions decode: the limit to build an inbound stream with.
pub fn max_session_message(hub: &Hub) -> usize {
    hub.max_session_message()
}

/// Serves one session of `hub` on `inbound` for the worker whose certificate (DER) is `peer`,
/// as the session listener does once the handshake has verified that certificate. Returns what
/// the hub sent, and the status it ended the stream with, once the session is over.
pub async fn session(
    hub: &Hub,
    peer: Vec<u8>,
    inbound: Streaming<AgentMessage>,
) -> Result<(Vec<HubMessage>, Option<Status>), Status> {
    // Held until the session is over: a session takes a dropped sender for a shutdown.
    let (_serving, stopped) = watch::channel(false);
    let mut responses = hub.session_service(stopped).0.open(peer, inbound).await?.into_inner();
    let (mut sent, mut ended) = (Vec::new(), None);
    while let Some(message) = responses.recv().await {
        match message {
            Ok(message) => sent.push(message),
            Err(status) => ended = Some(status),
        }
    }
    Ok((sent, ended))
}

/// Serves one registration of `hub`, as the registration listener does.
pub async fn register(hub: &Hub, request: RegisterRequest) -> Result<RegisterResponse, Status> {
    let service = RegistrationService { pki: hub.pki.clone() };
    service.register(Request::new(request)).await.map(tonic::Response::into_inner)
}
