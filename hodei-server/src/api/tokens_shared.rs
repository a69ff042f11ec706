//! The operator API's tokens in the PostgreSQL database the engines share (`hodei_api_tokens`,
//! created by the store's migrations), so that an operator's token works on every engine's API.
//!
//! Each call is one statement, which commits on its own. A name is unique in the table, so two
//! APIs issuing the same name at once cannot both succeed. A request's token is read from the
//! database each time rather than from a copy kept in memory: a revocation holds on every API
//! from the moment it returns, and with the database out of reach requests are refused.

use std::path::Path;
use std::sync::Arc;

use hodei_core::{PostgresStore, SqlParam, SqlRow};

use super::tokens::{ApiToken, Entry, FIRST_ADMIN, IssuedToken, Role, TokenError, mint, write_admin_token};

pub(super) struct SharedTokens {
    store: Arc<PostgresStore>,
}

impl std::fmt::Debug for SharedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTokens").field("engine", &self.store.engine_id()).finish()
    }
}

impl SharedTokens {
    /// The shared tokens; with none named [`FIRST_ADMIN`] yet, issues that one, writing it to
    /// `dir` first (as a store of its own does), and returns it.
    pub(super) fn open(
        store: Arc<PostgresStore>,
        dir: &Path,
    ) -> Result<(Self, Option<IssuedToken>), TokenError> {
        let tokens = Self { store };
        let existing = tokens.run(
            "look for the first admin token",
            "SELECT 1 FROM hodei_api_tokens WHERE name = $1",
            vec![Box::new(FIRST_ADMIN)],
        )?;
        if !existing.is_empty() {
            return Ok((tokens, None));
        }
        crate::files::create_private_dir(dir)?;
        let (selector, entry, admin) = mint(FIRST_ADMIN, Role::Admin)?;
        // The file first, as with a store of its own: a crash before the row is written leaves
        // no admin token, and the next start issues one into the same file.
        let file = write_admin_token(dir, &admin)?;
        if tokens.insert(selector, &entry)? {
            tracing::warn!(file = %file.display(), "issued the first admin token of the operator API");
            return Ok((tokens, Some(admin)));
        }
        // Another engine's API issued it at the same moment: this file holds no token.
        if let Err(e) = std::fs::remove_file(&file) {
            tracing::warn!(file = %file.display(), error = %e, "an admin token file that holds no token is left");
        }
        Ok((tokens, None))
    }

    fn run(
        &self,
        action: &'static str,
        sql: &'static str,
        params: Vec<SqlParam>,
    ) -> Result<Vec<SqlRow>, TokenError> {
        self.store
            .run_statement(action, sql, params)
            .map_err(|e| TokenError::Shared { action, reason: e.to_string() })
    }

    /// Stores `entry` unless its name is taken; whether it was stored.
    fn insert(&self, selector: String, entry: &Entry) -> Result<bool, TokenError> {
        let token = &entry.token;
        let created = i64::try_from(token.created_unix).unwrap_or(i64::MAX);
        let rows = self.run(
            "store a token",
            "INSERT INTO hodei_api_tokens (selector, secret_sha256, name, role, created_unix)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING RETURNING selector",
            vec![
                Box::new(selector),
                Box::new(entry.digest.to_vec()),
                Box::new(token.name.clone()),
                Box::new(token.role.to_string()),
                Box::new(created),
            ],
        )?;
        Ok(!rows.is_empty())
    }

    pub(super) fn issue(&self, name: &str, role: Role) -> Result<IssuedToken, TokenError> {
        let (selector, entry, issued) = mint(name, role)?;
        match self.insert(selector, &entry)? {
            true => Ok(issued),
            false => Err(TokenError::NameTaken(name.to_owned())),
        }
    }

    pub(super) fn revoke(&self, name: &str) -> Result<bool, TokenError> {
        let rows = self.run(
            "revoke a token",
            "UPDATE hodei_api_tokens SET revoked = true WHERE name = $1 AND NOT revoked RETURNING name",
            vec![Box::new(name.to_owned())],
        )?;
        Ok(!rows.is_empty())
    }

    pub(super) fn list(&self) -> Result<Vec<ApiToken>, TokenError> {
        let rows = self.run(
            "list the tokens",
            "SELECT secret_sha256, name, role, created_unix, revoked FROM hodei_api_tokens ORDER BY name",
            Vec::new(),
        )?;
        rows.iter().map(|row| entry(row).map(|entry| entry.token)).collect()
    }

    /// The entry of `selector`, if there is one.
    pub(super) fn entry(&self, selector: &str) -> Result<Option<Entry>, TokenError> {
        let rows = self.run(
            "read a token",
            "SELECT secret_sha256, name, role, created_unix, revoked FROM hodei_api_tokens WHERE selector = $1",
            vec![Box::new(selector.to_owned())],
        )?;
        rows.first().map(entry).transpose()
    }
}

/// A row as an entry; a row this build cannot read is an error naming it, never a token.
fn entry(row: &SqlRow) -> Result<Entry, TokenError> {
    let (digest, name, role, created, revoked): (Vec<u8>, String, String, i64, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let damaged = |reason: String| TokenError::Shared { action: "read a token", reason };
    let digest: [u8; 32] =
        digest.try_into().map_err(|_| damaged(format!("the digest of `{name}` is not 32 bytes")))?;
    let role = role.parse().map_err(|_| damaged(format!("`{name}` has an unknown role `{role}`")))?;
    let token = ApiToken { name, role, created_unix: u64::try_from(created).unwrap_or(0), revoked };
    Ok(Entry { token, digest })
}
