//! hodei-agent: the worker side of Hodei's wire.
//!
//! Inside-out: every worker runs the agent, which dials the control plane (`hodei-server`) over
//! gRPC with mutual TLS; the worker opens no port. This crate knows nothing of sagas or of the
//! control plane's internals: only the wire.
//! - [`protocol`]: the versioned protobuf package and the version handshake;
//! - [`pki`]: the agent's key and CSR, worker certificates as both sides read them, and the
//!   rustls configurations that enforce mTLS;
//! - [`connect`]: registering with a token and opening a session;
//! - [`runner`]: running one job on a worker: its process group, secrets on stdin, output read
//!   as bytes and batched with backpressure, secrets masked, cancellation and metrics;
//! - [`agent`]: the `hodei-agent` program: its settings (flags and environment), its stored key
//!   and certificate, and the loop that keeps a session up with heartbeats and backoff, runs
//!   the jobs it is assigned, keeps their output until acknowledged, and rotates its
//!   certificate.

pub mod agent;
pub mod connect;
pub mod pki;
pub mod protocol;
pub mod runner;
