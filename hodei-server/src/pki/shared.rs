//! The PKI of control planes that share a PostgreSQL database (`hodei_pki_*`, created by the
//! store's migrations), so that an agent may reach any of them: one CA, created by the first to
//! start and read back by every other; tokens any of them redeems, once; revocations each of
//! them checks at every handshake; and one record of the certified workers.
//!
//! Every call is one statement on the store's connections, which commits on its own. A token
//! is consumed by one conditional `UPDATE`, so two control planes redeeming it at once cannot
//! both succeed; only the SHA-256 of its secret is stored. A revocation is read from the
//! database at each handshake rather than from a copy kept in memory: it holds on every control
//! plane from the moment it commits, and a handshake while the database is out of reach is
//! refused, never let through unchecked. Handshakes are rare (an agent's connection lasts), so
//! the round trip costs little.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hodei_agent::pki::{ParsedWorkerCert, constant_time_eq};
use hodei_core::{PostgresStore, SqlParam, SqlRow};

use super::ca::CertificateAuthority;
use super::revocation::RevocationCheck;
use super::tokens::{Issued, RETENTION, RegistrationToken, judge, mint};
use super::{PkiError, Result};

/// Where a shared CA comes from, as errors about it name it.
const CA_SOURCE: &str = "postgres:hodei_pki_ca";

/// The PKI's state in the database of `store`.
pub(super) struct SharedPki {
    store: Arc<PostgresStore>,
}

impl std::fmt::Debug for SharedPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPki").field("engine", &self.store.engine_id()).finish()
    }
}

/// What a revocation names.
#[derive(Debug, Clone, Copy)]
pub(super) enum Revoked {
    Worker,
    Serial,
}

impl Revoked {
    fn kind(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Serial => "serial",
        }
    }
}

/// `time` in microseconds since the Unix epoch, as the tables keep it.
fn micros(time: SystemTime) -> Result<i64> {
    let since = time.duration_since(UNIX_EPOCH).map_err(|_| PkiError::TimeOutOfRange("before 1970"))?;
    i64::try_from(since.as_micros()).map_err(|_| PkiError::TimeOutOfRange("past the year 294,000"))
}

fn from_micros(micros: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

fn sha256(secret: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref().to_vec()
}

impl SharedPki {
    pub(super) fn new(store: Arc<PostgresStore>) -> Self {
        Self { store }
    }

    fn run(&self, action: &'static str, sql: &'static str, params: Vec<SqlParam>) -> Result<Vec<SqlRow>> {
        self.store
            .run_statement(action, sql, params)
            .map_err(|e| PkiError::Shared { action, source: Box::new(e) })
    }

    /// The CA every control plane on the database shares: created, valid from `now`, by the
    /// first to ask; each later one reads it back. Two asking at once both make one, and the
    /// database keeps the first written.
    pub(super) fn ca(&self, now: SystemTime) -> Result<CertificateAuthority> {
        const READ: &str = "SELECT key_pem, cert_pem FROM hodei_pki_ca WHERE id = 1";
        let read = |this: &Self| -> Result<Option<(String, String)>> {
            let rows = this.run("read the CA", READ, Vec::new())?;
            Ok(rows.first().map(|row| (row.get(0), row.get(1))))
        };
        let (key_pem, cert_pem) = match read(self)? {
            Some(pems) => pems,
            None => {
                let (key_pem, cert_pem) = CertificateAuthority::generate(now)?;
                let written = self.run(
                    "store the CA",
                    "INSERT INTO hodei_pki_ca (id, key_pem, cert_pem) VALUES (1, $1, $2)
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                    vec![Box::new(key_pem), Box::new(cert_pem)],
                )?;
                if !written.is_empty() {
                    tracing::info!("created the control planes' shared CA");
                }
                read(self)?.ok_or(PkiError::Shared {
                    action: "read the CA back",
                    source: "the CA row is gone right after it was written".into(),
                })?
            }
        };
        CertificateAuthority::load(Path::new(CA_SOURCE), &key_pem, cert_pem)
    }

    /// A one-time token for `worker_id`, redeemable on any control plane until `now + ttl`.
    pub(super) fn issue_token(
        &self,
        worker_id: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<RegistrationToken> {
        let (token, selector, secret) = mint(worker_id, now, ttl)?;
        // Tokens past their retention say "unknown" rather than "expired" or "replayed".
        let forget_before = micros(now.checked_sub(RETENTION).unwrap_or(UNIX_EPOCH))?;
        self.run(
            "forget old tokens",
            "DELETE FROM hodei_pki_tokens WHERE expires_at < $1",
            vec![Box::new(forget_before)],
        )?;
        self.run(
            "store a token",
            "INSERT INTO hodei_pki_tokens (selector, secret_sha256, worker_id, expires_at) VALUES ($1, $2, $3, $4)",
            vec![
                Box::new(selector),
                Box::new(sha256(&secret)),
                Box::new(worker_id.to_owned()),
                Box::new(micros(token.expires_at())?),
            ],
        )?;
        Ok(token)
    }

    /// Consumes `token` for `worker_id`, or says why not, as a control plane of its own would.
    pub(super) fn redeem(&self, token: &str, worker_id: &str, now: SystemTime) -> Result<()> {
        let (selector, secret) = token.split_once('.').ok_or(PkiError::UnknownToken)?;
        let digest = sha256(secret);
        let taken = self.run(
            "redeem a token",
            "UPDATE hodei_pki_tokens SET used = true
             WHERE selector = $1 AND secret_sha256 = $2 AND worker_id = $3 AND NOT used AND expires_at > $4
             RETURNING selector",
            vec![
                Box::new(selector.to_owned()),
                Box::new(digest.clone()),
                Box::new(worker_id.to_owned()),
                Box::new(micros(now)?),
            ],
        )?;
        if !taken.is_empty() {
            return Ok(());
        }
        // Not taken: say why, in the words of a control plane of its own.
        let rows = self.run(
            "read a token",
            "SELECT secret_sha256, used, expires_at, worker_id FROM hodei_pki_tokens WHERE selector = $1",
            vec![Box::new(selector.to_owned())],
        )?;
        let row = rows.first().ok_or(PkiError::UnknownToken)?;
        let (stored, bound): (Vec<u8>, String) = (row.get(0), row.get(3));
        let issued = Issued {
            secret_matches: constant_time_eq(&digest, &stored),
            used: row.get(1),
            expires_at: from_micros(row.get(2)),
            worker_id: &bound,
        };
        judge(&issued, worker_id, now)?;
        // Everything checks out now, so another control plane took it in between.
        Err(PkiError::TokenReplayed)
    }

    /// Refuses `worker_id` if it is revoked as a whole.
    pub(super) fn check_worker(&self, worker_id: &str) -> Result<()> {
        let rows = self.run(
            "check a revocation",
            "SELECT 1 FROM hodei_pki_revocations WHERE kind = 'worker' AND value = $1",
            vec![Box::new(worker_id.to_owned())],
        )?;
        match rows.is_empty() {
            true => Ok(()),
            false => Err(PkiError::WorkerRevoked(worker_id.to_owned())),
        }
    }

    /// Adds a revocation (`revoked`), or lifts one; whether that changed anything.
    pub(super) fn set_revoked(&self, what: Revoked, value: &str, revoked: bool) -> Result<bool> {
        let (action, sql) = match revoked {
            true => (
                "revoke",
                "INSERT INTO hodei_pki_revocations (kind, value) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING kind",
            ),
            false => (
                "lift a revocation",
                "DELETE FROM hodei_pki_revocations WHERE kind = $1 AND value = $2 RETURNING kind",
            ),
        };
        let rows = self.run(action, sql, vec![Box::new(what.kind()), Box::new(value.to_owned())])?;
        Ok(!rows.is_empty())
    }

    /// Records that `worker_id` holds a certificate valid until `not_after`, before it is
    /// handed out.
    pub(super) fn record_certified(&self, worker_id: &str, not_after: SystemTime) -> Result<()> {
        self.run(
            "record a certified worker",
            "INSERT INTO hodei_pki_certified (worker_id, not_after) VALUES ($1, $2)
             ON CONFLICT (worker_id) DO UPDATE SET not_after = GREATEST(hodei_pki_certified.not_after, EXCLUDED.not_after)",
            vec![Box::new(worker_id.to_owned()), Box::new(micros(not_after)?)],
        )?;
        Ok(())
    }

    /// Whether a certificate recorded for `worker_id` is still valid at `now`.
    pub(super) fn holds_certificate(&self, worker_id: &str, now: SystemTime) -> Result<bool> {
        let rows = self.run(
            "read the certified workers",
            "SELECT 1 FROM hodei_pki_certified WHERE worker_id = $1 AND not_after > $2",
            vec![Box::new(worker_id.to_owned()), Box::new(micros(now)?)],
        )?;
        Ok(!rows.is_empty())
    }
}

impl RevocationCheck for SharedPki {
    fn check(&self, cert: &ParsedWorkerCert) -> Result<()> {
        let rows = self.run(
            "check a revocation",
            "SELECT kind FROM hodei_pki_revocations
             WHERE (kind = 'worker' AND value = $1) OR (kind = 'serial' AND value = $2)",
            vec![Box::new(cert.worker_id.clone()), Box::new(cert.serial.to_string())],
        )?;
        let kinds: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        if kinds.iter().any(|kind| kind == "worker") {
            return Err(PkiError::WorkerRevoked(cert.worker_id.clone()));
        }
        match kinds.is_empty() {
            true => Ok(()),
            false => Err(PkiError::CertificateRevoked(cert.serial.clone())),
        }
    }
}
