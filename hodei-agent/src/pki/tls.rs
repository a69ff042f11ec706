//! The rustls configurations of the hub's listeners and of the agent.

use std::fmt;
use std::sync::{Arc, LazyLock};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::NoServerSessionStorage;
use rustls::server::danger::ClientCertVerifier;
use rustls::time_provider::TimeProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::{Clock, PkiError, Result};

/// gRPC runs over HTTP/2, which TLS negotiates by ALPN.
const GRPC_ALPN: &[u8] = b"h2";

/// Both ends are ours, so there is no older peer to accommodate.
static VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// A certificate chain and its private key: the hub's server identity, or an agent's client one.
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity").field("chain", &self.chain.len()).finish_non_exhaustive()
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl TlsIdentity {
    /// From a certificate chain (PEM, leaf first) and its private key (PEM).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self> {
        let chain = parse_certs(chain_pem, "certificate chain")?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| invalid_pem("private key", e.to_string()))?
            .ok_or_else(|| invalid_pem("private key", "no private key in the PEM".into()))?;
        Ok(Self { chain, key })
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }
}

fn invalid_pem(what: &'static str, reason: String) -> PkiError {
    PkiError::InvalidPem { what, reason }
}

fn tls_error(e: rustls::Error) -> PkiError {
    PkiError::TlsConfig(e.to_string())
}

/// Every certificate in `pem`; at least one, or an error naming `what`.
pub fn parse_certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid_pem(what, e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid_pem(what, "no certificate in the PEM".into()));
    }
    Ok(certs)
}

pub fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).map_err(|e| invalid_pem("CA certificate", e.to_string()))?;
    }
    Ok(store)
}

/// The ring provider, passed explicitly so that nothing depends on a process-wide default.
/// One instance serves every configuration and verifier, and [`super::random_bytes`].
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static RING: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| Arc::new(ring_provider()));
    RING.clone()
}

/// rustls's *ring* provider, the only place that names it. From rustls 0.23.48 on,
/// `crypto::ring::default_provider` is deprecated ("no support for post-quantum algorithms")
/// with no *ring* successor in 0.23 (rustls's own docs still point *ring* users to it; the
/// separate `rustls-ring` crate is for rustls 0.24). The alternative it steers to is aws-lc-rs,
/// which this crate keeps out on purpose (see its Cargo.toml), so the trade-off is accepted
/// here, once. `allow`, not `expect`: with the locked rustls there is nothing to expect.
#[allow(
    deprecated,
    reason = "ring is this crate's deliberate provider; rustls 0.23 has no non-deprecated ring API"
)]
fn ring_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// rustls's time, taken from the hub's clock, so that handshakes and the CA agree on "now".
#[derive(Debug)]
struct ClockTime(Arc<dyn Clock>);

impl TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        super::unix_time(self.0.now()).ok()
    }
}

/// A listener's configuration: this crate's protocol versions and ALPN, the given client
/// verifier (the control plane's revocation-checking one, or none for registration), and no
/// session resumption.
pub fn server_config(
    provider: &Arc<CryptoProvider>,
    clock: &Arc<dyn Clock>,
    verifier: Arc<dyn ClientCertVerifier>,
    identity: &TlsIdentity,
) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_details(provider.clone(), Arc::new(ClockTime(clock.clone())))
        .with_protocol_versions(VERSIONS)
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_error)?;
    // A resumed session skips the client-certificate verifier, so it would outlive a
    // revocation or the certificate's expiry: every connection does a full handshake.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![GRPC_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The agent's configuration: it trusts only the CA certificates in `ca_bundle_pem` (from its
/// provisioning, not the system's roots), and presents `identity` when it has one (to the mTLS
/// listener) or nothing (to the registration listener).
pub fn agent_client_config(ca_bundle_pem: &str, identity: Option<&TlsIdentity>) -> Result<Arc<ClientConfig>> {
    let roots = root_store(&parse_certs(ca_bundle_pem, "CA bundle")?)?;
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(VERSIONS)
        .map_err(tls_error)?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(tls_error)?,
        None => builder.with_no_client_auth(),
    };
    // The hub does not resume sessions; offering it would only cost a round of ticket handling.
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![GRPC_ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_a_typed_error() {
        for bad in ["", "garbage", "-----BEGIN CERTIFICATE-----\nAAAA"] {
            assert!(matches!(agent_client_config(bad, None), Err(PkiError::InvalidPem { .. })), "{bad:?}");
        }
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(agent_client_config(cert, None), Err(PkiError::InvalidPem { .. })));
        assert!(matches!(TlsIdentity::from_pem(cert, "no key"), Err(PkiError::InvalidPem { .. })));
    }
}
