//! A TCP proxy on loopback that the test can cut: every connection through it is dropped at
//! once, and new ones are refused, until it is restored. It stands for a network partition
//! between one engine and its database. Shared with `hodei-server/tests/postgres_jobs_chaos.rs`
//! by `#[path]`.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct TcpProxy {
    pub port: u16,
    cut: watch::Sender<bool>,
}

impl TcpProxy {
    /// A proxy in front of the server of `url` (`postgres://user:password@host:port/db`), and
    /// `url` through it.
    pub async fn in_front_of(url: &str) -> (TcpProxy, String) {
        let (credentials, rest) = url.rsplit_once('@').unwrap();
        let (host_port, database) = rest.split_once('/').unwrap_or((rest, ""));
        let proxy = TcpProxy::start(host_port.parse().unwrap()).await;
        let through = format!("{credentials}@127.0.0.1:{}/{database}", proxy.port);
        (proxy, through)
    }

    /// Forwards 127.0.0.1:`port` to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = watch::Sender::new(false);
        let watching = cut.subscribe();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *watching.borrow() {
                    continue;
                }
                let mut cut = watching.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        TcpProxy { port, cut }
    }

    /// Cuts every connection, and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}
