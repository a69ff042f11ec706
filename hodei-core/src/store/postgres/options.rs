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
}

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
