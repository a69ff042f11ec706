//! The baselines: what the hardware and the libraries underneath allow, with none of hodei's
//! protocol, batching or storage on top. Each runs with the same TLS configurations the hub and
//! agent use (TLS 1.3 only, rustls on ring, certificates from the hub's PKI).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::harness::within;

/// Bytes per write and per read: the default pipe capacity, which is also what the agent's
/// runner reads from a job's pipe at once.
const CHUNK: usize = 64 * 1024;

fn loopback_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into())
}

/// Reads `reader` to its end and returns how many bytes came.
async fn drain(mut reader: impl AsyncRead + Unpin) -> usize {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        match reader.read(&mut buf).await.expect("reading a stream") {
            0 => return total,
            n => total += n,
        }
    }
}

/// A TLS connection on loopback with the given configurations: the client's end, and the
/// server's task, which reads to the end and returns how many bytes came and when the last did.
async fn tls_connection(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (tokio_rustls::client::TlsStream<TcpStream>, tokio::task::JoinHandle<(usize, Instant)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding a loopback port");
    let addr = listener.local_addr().expect("the bound address");
    let acceptor = TlsAcceptor::from(server);
    let receiver = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accepting");
        let tls = acceptor.accept(tcp).await.expect("the server side of the handshake");
        let received = drain(tls).await;
        (received, Instant::now())
    });
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    let tls = TlsConnector::from(client).connect(loopback_name(), tcp).await.expect("the handshake");
    (tls, receiver)
}

/// Closes the client's end and waits for the server to have read `bytes`; returns when it had.
async fn finish(
    mut tls: tokio_rustls::client::TlsStream<TcpStream>,
    receiver: tokio::task::JoinHandle<(usize, Instant)>,
    bytes: usize,
) -> Instant {
    tls.shutdown().await.expect("closing the stream");
    let (received, finished) = within("the raw TLS stream", receiver).await.expect("the receiving task");
    assert_eq!(received, bytes, "the raw stream must deliver every byte");
    finished
}

/// Streams `bytes` over one TLS connection on loopback as fast as it goes: the client writes
/// 64 KiB at a time, the server reads to the end. Returns the time from connecting to the last
/// byte read.
pub async fn tls_stream(server: Arc<ServerConfig>, client: Arc<ClientConfig>, bytes: usize) -> Duration {
    let started = Instant::now();
    let (mut tls, receiver) = tls_connection(server, client).await;
    let chunk = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK);
        tls.write_all(&chunk[..n]).await.expect("writing");
        left -= n;
    }
    finish(tls, receiver, bytes).await - started
}

/// The job's stdout copied straight into one raw TLS stream, 64 KiB at a time: the least any
/// agent must do to move a job's output to another process over TLS on the same two cores,
/// with none of hodei's runner, protocol or storage. Returns the time and the bytes moved.
pub async fn job_over_tls(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    command: &[&str],
) -> (Duration, usize) {
    let started = Instant::now();
    let (mut tls, receiver) = tls_connection(server, client).await;
    let mut child = spawn_piped(command);
    let mut stdout = child.stdout.take().expect("a piped stdout");
    let mut buf = vec![0u8; CHUNK];
    let mut moved = 0;
    loop {
        match stdout.read(&mut buf).await.expect("reading the job's stdout") {
            0 => break,
            n => {
                tls.write_all(&buf[..n]).await.expect("writing");
                moved += n;
            }
        }
    }
    let status = child.wait().await.expect("reaping the command");
    assert!(status.success(), "{command:?} ended with {status}");
    (finish(tls, receiver, moved).await - started, moved)
}

/// One TCP connect and TLS handshake with `client` to `addr`, complete on the client's side.
pub async fn handshake(addr: SocketAddr, client: Arc<ClientConfig>) -> Duration {
    let started = Instant::now();
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    let tls = TlsConnector::from(client).connect(loopback_name(), tcp).await.expect("the handshake");
    let took = started.elapsed();
    drop(tls);
    took
}

/// Runs `command` straight under tokio, its stdout read 64 KiB at a time to its end: what the
/// job costs with no runner, agent or hub around it. Returns the time and the bytes read.
pub async fn pipe_read(command: &[&str]) -> (Duration, usize) {
    let started = Instant::now();
    let mut child = spawn_piped(command);
    let stdout = child.stdout.take().expect("a piped stdout");
    let read = drain(stdout).await;
    let status = child.wait().await.expect("reaping the command");
    assert!(status.success(), "{command:?} ended with {status}");
    (started.elapsed(), read)
}

/// Writes `bytes` to a new file in `dir`, `chunk` bytes at a time, each write followed by a
/// `sync_data`: the disk's own figure for what the log store does, which syncs at most once per
/// batch it writes (its group commit covers several at once when batches arrive during a sync).
/// Returns the time from creating the file to the last sync.
pub async fn synced_writes(dir: &Path, bytes: usize, chunk: usize) -> Duration {
    let path = dir.join("synced-writes");
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut file = std::fs::File::create(&path).expect("creating the file");
        let block = vec![0u8; chunk];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk);
            file.write_all(&block[..n]).expect("writing");
            file.sync_data().expect("syncing");
            left -= n;
        }
        let took = started.elapsed();
        std::fs::remove_file(&path).expect("removing the file");
        took
    })
    .await
    .expect("the writing thread")
}

/// Spawns `command` with only its stdout piped.
fn spawn_piped(command: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(command[0])
        .args(&command[1..])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the command")
}

/// Nanoseconds since the epoch, as `date +%s%N` prints them.
pub fn now_unix_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("a clock after 1970").as_nanos()
}

/// The instant `date +%s%N` printed, as the job's own proof that its process was running.
pub fn printed_unix_ns(output: &[u8]) -> u128 {
    let text = std::str::from_utf8(output).expect("date prints ASCII");
    text.trim().parse().unwrap_or_else(|_| panic!("`{text}` is not a date +%s%N stamp"))
}

/// Spawns `date +%s%N` straight under tokio. Returns the time from the spawn call to the
/// process running (from its own clock reading) and to its output read and its exit reaped.
pub async fn spawn_date() -> (Duration, Duration) {
    let (called_ns, started) = (now_unix_ns(), Instant::now());
    let output = tokio::process::Command::new(DATE[0])
        .args(&DATE[1..])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .await
        .expect("running date");
    let done = started.elapsed();
    assert!(output.status.success(), "date ended with {}", output.status);
    (since(called_ns, printed_unix_ns(&output.stdout)), done)
}

/// The job whose first act is to read the clock.
pub const DATE: [&str; 2] = ["/usr/bin/date", "+%s%N"];

/// From `earlier_ns` to `later_ns`; both come from the same realtime clock on this machine.
pub fn since(earlier_ns: u128, later_ns: u128) -> Duration {
    let ns = later_ns.checked_sub(earlier_ns).expect("the job's clock reading precedes its dispatch");
    Duration::from_nanos(u64::try_from(ns).expect("under 584 years"))
}
