//! The operator API: what operators use to watch and steer the control plane from outside its
//! process. So far, its bearer tokens ([`tokens`]) and webhook signatures ([`signature`]); the
//! HTTP endpoints build on them.

pub mod signature;
pub mod tokens;

pub use signature::{SIGNATURE_HEADER, SignatureError, verify_signature};
pub use tokens::{ApiToken, IssuedToken, Role, TokenError, TokenStore};
