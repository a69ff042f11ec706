//! One TLS connection over loopback between a server and a client configuration, each side
//! run to its end: what the hub's mTLS listener would accept or refuse.

#![allow(dead_code)]

use std::io;
use std::sync::Arc;

use hodei_agent::pki::worker_id_from_certificate;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What each side of one connection saw: the server, the worker id it read off the peer
/// certificate (empty without one); the client, what the server sent it (that worker id).
pub struct Outcome {
    pub server: io::Result<String>,
    pub client: io::Result<String>,
}

impl Outcome {
    pub fn accepted(self) -> String {
        let id = self.server.expect("the server accepts the connection");
        assert_eq!(self.client.expect("the client completes"), id, "both sides see the same id");
        id
    }

    pub fn refused_by_server(self) -> rustls::Error {
        let err = self.server.expect_err("the server refuses the connection");
        assert!(self.client.is_err(), "the client does not get through either");
        rustls_error(&err)
    }
}

pub fn rustls_error(err: &io::Error) -> rustls::Error {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
        .unwrap_or_else(|| panic!("not a TLS error: {err}"))
}

/// One TLS connection over loopback; each side runs to its end, so no timing is involved.
pub async fn connect(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accept = async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let id = match tls.get_ref().1.peer_certificates().and_then(|chain| chain.first()) {
            Some(cert) => worker_id_from_certificate(cert).map_err(io::Error::other)?,
            None => String::new(),
        };
        tls.write_all(id.as_bytes()).await?;
        tls.shutdown().await?;
        Ok(id)
    };
    let dial = async move {
        let tcp = TcpStream::connect(address).await?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
        let mut received = String::new();
        // In TLS 1.3 the client finishes its handshake before the server has judged the client
        // certificate; a refusal arrives as an alert on this read.
        tls.read_to_string(&mut received).await?;
        Ok(received)
    };
    let (server, client) = tokio::join!(accept, dial);
    Outcome { server, client }
}
