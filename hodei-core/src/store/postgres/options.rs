use std::time::Duration;

use rustls::pki_types::CertificateDer;

use super::PostgresError;

/// How [`PostgresStore::connect_with`](super::PostgresStore::connect_with) uses a database.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// The schema holding Hodei's tables, created if missing (default: the connection's
    /// `search_path`, usually `public`). Several Hodei deployments, or tests, can share a
    /// database with one schema each.
    pub schema: Option<String>,
    /// Certificates (DER) trusted for the server's TLS certificate besides the system's roots:
    /// a private CA's.
    pub root_certificates: Vec<Vec<u8>>,
    /// The name of this engine among those sharing the database (default: a new random one
    /// at every connect). With a name that outlives the process, a restarted engine takes its
    /// sagas back at once instead of after its old lease lapses; two live engines must never
    /// share one.
    pub engine_id: Option<String>,
    /// How long an engine's lease on its sagas lasts without a renewal (default
    /// [`DEFAULT_LEASE`]): how long the sagas of an engine that died wait before another
    /// takes them over. It is renewed five times per lease.
    pub lease: Option<Duration>,
}

/// The lease of an engine on its sagas, unless [`PostgresOptions::lease`] says otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

impl PostgresOptions {
    /// See [`schema`](Self::schema).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Adds a certificate (DER) to [`root_certificates`](Self::root_certificates).
    pub fn root_certificate(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.root_certificates.push(der.into());
        self
    }

    /// See [`engine_id`](Self::engine_id).
    pub fn engine_id(mut self, id: impl Into<String>) -> Self {
        self.engine_id = Some(id.into());
        self
    }

    /// See [`lease`](Self::lease).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The lease, refused if too short to renew on time (under 100 ms) or too long to mean
    /// anything (over a day).
    pub(super) fn checked_lease(&self) -> Result<Duration, PostgresError> {
        let lease = self.lease.unwrap_or(DEFAULT_LEASE);
        if (Duration::from_millis(100)..=Duration::from_secs(86_400)).contains(&lease) {
            Ok(lease)
        } else {
            Err(PostgresError::InvalidLease(lease))
        }
    }

    /// This engine's id: the one given, or a new random one.
    pub(super) fn member(&self) -> String {
        self.engine_id.clone().unwrap_or_else(|| {
            let mut bytes = [0u8; 8];
            // The randomness of the TLS provider the store uses already.
            let random = rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes);
            let suffix = match random {
                Ok(()) => bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                // No system randomness: the clock and the process id still tell engines apart.
                Err(_) => format!("{:x}-{:?}", std::process::id(), std::time::SystemTime::now()),
            };
            format!("engine-{suffix}")
        })
    }

    pub(super) fn checked_schema(&self) -> Result<Option<&str>, PostgresError> {
        let Some(schema) = self.schema.as_deref() else { return Ok(None) };
        let mut chars = schema.chars();
        let plain = schema.len() <= 63
            && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        // Only plain identifiers: the name is spliced into DDL and into `search_path`.
        if plain { Ok(Some(schema)) } else { Err(PostgresError::InvalidSchema(schema.into())) }
    }

    pub(super) fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.root_certificates.iter().map(|der| CertificateDer::from(der.clone())).collect()
    }
}
