//! hodei-agent: the wire protocol, the control-plane hub, and the worker agent.
//!
//! Inside-out: every worker runs the agent, which dials the control plane's hub over gRPC with
//! mutual TLS; the worker opens no port. Jobs run as durable saga steps ([`jobs`]) and outlive
//! the connection: output is resent from the last acknowledged offset, and a restarted control
//! plane re-attaches to jobs that went on without it.
//! - [`protocol`]: the versioned protobuf package and the version handshake;
//! - [`pki`]: the embedded CA, one-time registration tokens, per-worker certificates, and the
//!   rustls configurations that enforce mTLS;
//! - [`runner`]: running one job on a worker: its process group, secrets on stdin, output read
//!   as bytes and batched with backpressure, secrets masked, cancellation and metrics;
//! - [`logstore`]: the control plane's per-job log files: offsets acknowledged only once on
//!   disk, resends stored once, a visible truncation marker past the cap, and following;
//! - [`hub`]: the control plane's registration and mutual-TLS session listeners (tonic over the
//!   PKI's rustls configurations): registration, the Hello/Welcome handshake, heartbeats, the
//!   registry of connected workers, and running a job on a worker with its output stored;
//! - [`connect`]: the agent's side of the same: registering with a token and opening a session;
//! - [`agent`]: the `hodei-agent` program: its settings (flags and environment), its stored key
//!   and certificate, and the loop that keeps a session up with heartbeats and backoff, runs
//!   the jobs it is assigned, keeps their output until acknowledged, and rotates its
//!   certificate;
//! - [`jobs`]: remote jobs as durable saga steps: the journaled job (secret names only), secret
//!   sources resolved at dispatch, and the step whose job id is its idempotency key.
//!
//! Workers come from `hodei-providers`, whose scheduler implements [`jobs::WorkerPool`].

pub mod agent;
pub mod connect;
pub mod hub;
pub mod jobs;
pub mod logstore;
pub mod pki;
pub mod protocol;
pub mod runner;
