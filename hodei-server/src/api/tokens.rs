//! The operator API's bearer tokens: named, with a role, stored hashed in the data directory.
//!
//! A token reads `hodei_<selector>_<secret>`: the selector (8 random bytes, hex) finds its
//! entry, and the secret (32 random bytes, hex) is checked against the stored SHA-256 of it in
//! constant time. Only the digest is stored, so the file gives nobody a token; a token is shown
//! once, when it is issued. The first open of a directory issues an admin token and writes it to
//! [`ADMIN_TOKEN_FILE`] (mode 0600), the way the embedded CA writes its key, and says where.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use hodei_agent::pki::{constant_time_eq, hex, random_bytes, unhex};

use crate::files::{FileError, create_private_dir, read_optional, write_atomically};

/// The subdirectory of the data directory that holds the API's files.
pub const API_DIR: &str = "api";
/// The token store, in [`API_DIR`].
pub const TOKENS_FILE: &str = "tokens";
/// The first admin token, in [`API_DIR`], written once when the store is created.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The name of the first admin token.
pub const FIRST_ADMIN: &str = "admin";

const TOKEN_PREFIX: &str = "hodei_";
const SELECTOR_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
const FORMAT: &str = "v1";
const MAX_NAME_LEN: usize = 64;

/// What a token may do. Each role may do what the roles below it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Reads: definitions, runs, journals, logs, workers.
    Viewer,
    /// Also starts, signals (approves), cancels, forks, retries, pauses and resumes runs.
    Operator,
    /// Also issues and revokes tokens.
    Admin,
}

impl Role {
    /// Whether this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(TokenError::UnknownRole(other.to_owned())),
        }
    }
}

/// What the token store can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Reading or writing the store failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// A line of the store is not what this build writes: edited by hand, or damaged. The
    /// file is left as it is for an operator.
    #[error("{path}, line {line}: {reason}")]
    Corrupt {
        /// The store.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A token's name is empty, too long, or has characters outside the allowed set.
    #[error("invalid token name {0:?}: 1 to 64 ASCII letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    /// A token of that name exists (revoked ones too: names stay unique in the journal).
    #[error("a token named `{0}` exists already")]
    NameTaken(String),
    /// No role has that name.
    #[error("unknown role `{0}`: viewer, operator or admin")]
    UnknownRole(String),
    /// What was presented is not a Hodei API token.
    #[error("not a Hodei API token")]
    Malformed,
    /// No token matches: unknown selector, or a wrong secret.
    #[error("unknown token")]
    Unknown,
    /// The token was revoked.
    #[error("token `{0}` is revoked")]
    Revoked(String),
    /// The system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The database the engines share their tokens in failed or is out of reach: nothing was
    /// issued or revoked, and a request is refused rather than let through unchecked.
    #[error("the shared token store could not {action}: {reason}")]
    Shared {
        /// What was being done.
        action: &'static str,
        /// The database's error.
        reason: String,
    },
}

/// A token as the store lists it: never its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiToken {
    /// Its name: what the journal records as who did something.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was issued, in Unix seconds.
    pub created_unix: u64,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// A token just issued: the only time its secret is known. `Debug` leaves it out.
#[derive(Clone)]
pub struct IssuedToken {
    /// The token's entry.
    pub token: ApiToken,
    secret: String,
}

impl IssuedToken {
    /// The bearer token to hand to its user.
    pub fn bearer(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken").field("token", &self.token).finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) token: ApiToken,
    pub(super) digest: [u8; 32],
}

/// The API's tokens, persisted in `<data>/api/tokens`, or in the database the engines share
/// ([`TokenStore::open_shared`]). Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct TokenStore {
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    File(FileTokens),
    #[cfg(feature = "postgres")]
    Shared(super::tokens_shared::SharedTokens),
}

/// The tokens of one engine's API, in its data directory.
#[derive(Debug)]
struct FileTokens {
    path: PathBuf,
    /// By selector.
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl TokenStore {
    /// The tokens every engine's API on the database of `store` shares: one issued by any is
    /// accepted by all, and a revocation holds on all of them at the next request. When no
    /// first admin token exists yet, this one issues it and writes it to [`ADMIN_TOKEN_FILE`]
    /// in `data_dir` (mode 0600), and returns it; an API that starts at the same moment and
    /// loses the race writes none.
    #[cfg(feature = "postgres")]
    pub fn open_shared(
        store: std::sync::Arc<hodei_core::PostgresStore>,
        data_dir: &Path,
    ) -> Result<(Self, Option<IssuedToken>), TokenError> {
        let (shared, first) = super::tokens_shared::SharedTokens::open(store, &data_dir.join(API_DIR))?;
        Ok((Self { backend: Backend::Shared(shared) }, first))
    }

    /// Issues a token named `name` with `role`.
    pub fn issue(&self, name: &str, role: Role) -> Result<IssuedToken, TokenError> {
        check_name(name)?;
        match &self.backend {
            Backend::File(file) => file.issue(name, role),
            #[cfg(feature = "postgres")]
            Backend::Shared(shared) => shared.issue(name, role),
        }
    }

    /// Revokes the token named `name`. Returns whether it was live.
    pub fn revoke(&self, name: &str) -> Result<bool, TokenError> {
        match &self.backend {
            Backend::File(file) => file.revoke(name),
            #[cfg(feature = "postgres")]
            Backend::Shared(shared) => shared.revoke(name),
        }
    }

    /// Every token, revoked ones too, by name.
    pub fn list(&self) -> Result<Vec<ApiToken>, TokenError> {
        match &self.backend {
            Backend::File(file) => Ok(file.list()),
            #[cfg(feature = "postgres")]
            Backend::Shared(shared) => shared.list(),
        }
    }

    /// The token `bearer` is, if it is live.
    pub fn authenticate(&self, bearer: &str) -> Result<ApiToken, TokenError> {
        let (selector, secret) = parse_bearer(bearer)?;
        let found = match &self.backend {
            Backend::File(file) => file.entries().get(selector).cloned(),
            #[cfg(feature = "postgres")]
            Backend::Shared(shared) => shared.entry(selector)?,
        };
        let entry = found.ok_or(TokenError::Unknown)?;
        if !constant_time_eq(&entry.digest, &digest(secret.as_bytes())) {
            return Err(TokenError::Unknown);
        }
        if entry.token.revoked {
            return Err(TokenError::Revoked(entry.token.name.clone()));
        }
        Ok(entry.token)
    }
}

/// A bearer token's selector and secret, if it has the form of one.
fn parse_bearer(bearer: &str) -> Result<(&str, &str), TokenError> {
    bearer
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .filter(|(selector, secret)| {
            unhex(selector).is_some_and(|b| b.len() == SELECTOR_BYTES)
                && unhex(secret).is_some_and(|b| b.len() == SECRET_BYTES)
        })
        .ok_or(TokenError::Malformed)
}

impl TokenStore {
    /// Opens the store in `data_dir`, creating it with a first admin token if there is none.
    /// Returns the store and, when it was just created, that token (also written to
    /// [`ADMIN_TOKEN_FILE`], mode 0600).
    pub fn open(data_dir: &Path) -> Result<(Self, Option<IssuedToken>), TokenError> {
        let dir = data_dir.join(API_DIR);
        let path = dir.join(TOKENS_FILE);
        let Some(text) = read_optional(&path)? else {
            create_private_dir(&dir)?;
            let (selector, entry, admin) = mint(FIRST_ADMIN, Role::Admin)?;
            // The token's file first: a crash before the store is written leaves no store, and
            // the next open issues a new token into the same file; the other order could leave
            // a store whose only admin token nobody has.
            let file = write_admin_token(&dir, &admin)?;
            let store = FileTokens { path, entries: Mutex::new(BTreeMap::from([(selector, entry)])) };
            store.persist(&store.entries())?;
            tracing::warn!(file = %file.display(), "issued the first admin token of the operator API");
            return Ok((Self { backend: Backend::File(store) }, Some(admin)));
        };
        let entries = parse(&path, &text)?;
        Ok((Self { backend: Backend::File(FileTokens { path, entries: Mutex::new(entries) }) }, None))
    }
}

/// Writes the first admin token to [`ADMIN_TOKEN_FILE`] in `dir`, mode 0600; returns the file.
pub(super) fn write_admin_token(dir: &Path, admin: &IssuedToken) -> Result<PathBuf, TokenError> {
    let file = dir.join(ADMIN_TOKEN_FILE);
    write_atomically(&file, format!("{}\n", admin.bearer()).as_bytes(), 0o600)?;
    Ok(file)
}

impl FileTokens {
    fn issue(&self, name: &str, role: Role) -> Result<IssuedToken, TokenError> {
        let mut entries = self.entries();
        if entries.values().any(|e| e.token.name == name) {
            return Err(TokenError::NameTaken(name.to_owned()));
        }
        let (selector, entry, issued) = mint(name, role)?;
        let mut next = entries.clone();
        next.insert(selector, entry);
        self.persist(&next)?;
        *entries = next;
        Ok(issued)
    }

    fn revoke(&self, name: &str) -> Result<bool, TokenError> {
        let mut entries = self.entries();
        let Some(selector) = entries.iter().find(|(_, e)| e.token.name == name).map(|(s, _)| s.clone())
        else {
            return Ok(false);
        };
        if entries[&selector].token.revoked {
            return Ok(false);
        }
        let mut next = entries.clone();
        if let Some(entry) = next.get_mut(&selector) {
            entry.token.revoked = true;
        }
        self.persist(&next)?;
        *entries = next;
        Ok(true)
    }

    fn list(&self) -> Vec<ApiToken> {
        let mut tokens: Vec<_> = self.entries().values().map(|e| e.token.clone()).collect();
        tokens.sort_by(|a, b| a.name.cmp(&b.name));
        tokens
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn persist(&self, entries: &BTreeMap<String, Entry>) -> Result<(), TokenError> {
        let mut text = String::new();
        for (selector, e) in entries {
            let t = &e.token;
            text.push_str(&format!(
                "{FORMAT} {selector} {} {} {} {} {}\n",
                hex(&e.digest),
                t.role,
                t.created_unix,
                u8::from(t.revoked),
                t.name
            ));
        }
        write_atomically(&self.path, text.as_bytes(), 0o600)?;
        Ok(())
    }
}

/// A new token: its selector, its stored entry, and the token as issued.
pub(super) fn mint(name: &str, role: Role) -> Result<(String, Entry, IssuedToken), TokenError> {
    let selector = hex(&random_bytes::<SELECTOR_BYTES>().map_err(|_| TokenError::Random)?);
    let secret = hex(&random_bytes::<SECRET_BYTES>().map_err(|_| TokenError::Random)?);
    let token = ApiToken { name: name.to_owned(), role, created_unix: now_unix(), revoked: false };
    let entry = Entry { token: token.clone(), digest: digest(secret.as_bytes()) };
    Ok((selector.clone(), entry, IssuedToken { token, secret: format!("{TOKEN_PREFIX}{selector}_{secret}") }))
}

fn parse(path: &Path, text: &str) -> Result<BTreeMap<String, Entry>, TokenError> {
    let mut entries = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let corrupt = |reason: &str| TokenError::Corrupt {
            path: path.to_owned(),
            line: index + 1,
            reason: reason.into(),
        };
        let fields: Vec<_> = line.split(' ').collect();
        let [format, selector, digest_hex, role, created, revoked, name] = fields[..] else {
            return Err(corrupt("expected 7 fields"));
        };
        if format != FORMAT {
            return Err(corrupt("unknown format"));
        }
        let digest: [u8; 32] = unhex(digest_hex)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| corrupt("the digest is not 32 bytes of hex"))?;
        let role = role.parse().map_err(|_| corrupt("unknown role"))?;
        let created_unix = created.parse().map_err(|_| corrupt("the creation time is not a number"))?;
        let revoked = match revoked {
            "0" => false,
            "1" => true,
            _ => return Err(corrupt("the revoked flag is not 0 or 1")),
        };
        check_name(name).map_err(|_| corrupt("invalid name"))?;
        if unhex(selector).is_none_or(|b| b.len() != SELECTOR_BYTES) {
            return Err(corrupt("the selector is not 8 bytes of hex"));
        }
        let token = ApiToken { name: name.to_owned(), role, created_unix, revoked };
        if entries.insert(selector.to_owned(), Entry { token, digest }).is_some() {
            return Err(corrupt("a selector appears twice"));
        }
    }
    Ok(entries)
}

fn check_name(name: &str) -> Result<(), TokenError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid { Ok(()) } else { Err(TokenError::InvalidName(name.to_owned())) }
}

pub(crate) fn digest(secret: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, secret).as_ref());
    out
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (TokenStore, Option<IssuedToken>) {
        TokenStore::open(dir).unwrap()
    }

    #[test]
    fn the_first_open_issues_an_admin_token_into_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let (store, admin) = open(dir.path());
        let admin = admin.expect("a new store issues the first admin token");
        let file = dir.path().join(API_DIR).join(ADMIN_TOKEN_FILE);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{}\n", admin.bearer()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(store.authenticate(admin.bearer()).unwrap().role, Role::Admin);
        // Reopened: the same token works, and no new one is issued.
        let (again, none) = open(dir.path());
        assert!(none.is_none());
        assert_eq!(again.authenticate(admin.bearer()).unwrap().name, FIRST_ADMIN);
    }

    #[test]
    fn the_store_holds_digests_never_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        let viewer = store.issue("dashboard", Role::Viewer).unwrap();
        let stored = std::fs::read_to_string(dir.path().join(API_DIR).join(TOKENS_FILE)).unwrap();
        let secret = viewer.bearer().rsplit('_').next().unwrap();
        assert!(!stored.contains(secret), "{stored}");
        assert!(!format!("{viewer:?}").contains(secret));
        assert!(stored.contains(" viewer ") && stored.contains(" dashboard\n"), "{stored}");
    }

    #[test]
    fn roles_allow_what_the_roles_below_them_allow() {
        assert!(Role::Admin.allows(Role::Operator) && Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator) && !Role::Operator.allows(Role::Admin));
        assert_eq!("operator".parse::<Role>().unwrap(), Role::Operator);
        assert!(matches!("root".parse::<Role>(), Err(TokenError::UnknownRole(r)) if r == "root"));
    }

    #[test]
    fn a_wrong_secret_a_malformed_token_and_a_revoked_one_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        let ci = store.issue("ci-bot", Role::Operator).unwrap();
        let bearer = ci.bearer();
        let mut wrong = bearer.to_owned();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert!(matches!(store.authenticate(&wrong), Err(TokenError::Unknown)));
        for malformed in ["", "Bearer x", "hodei_zz_zz", &bearer[..bearer.len() - 2]] {
            assert!(matches!(store.authenticate(malformed), Err(TokenError::Malformed)), "{malformed:?}");
        }
        assert!(store.revoke("ci-bot").unwrap());
        assert!(!store.revoke("ci-bot").unwrap());
        assert!(matches!(store.authenticate(bearer), Err(TokenError::Revoked(name)) if name == "ci-bot"));
        // Revocation survives a reopen.
        let (again, _) = open(dir.path());
        assert!(matches!(again.authenticate(bearer), Err(TokenError::Revoked(_))));
        assert!(again.list().unwrap().iter().any(|t| t.name == "ci-bot" && t.revoked));
    }

    #[test]
    fn names_are_checked_and_unique() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        for bad in ["", "a b", "é", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(matches!(store.issue(bad, Role::Viewer), Err(TokenError::InvalidName(_))), "{bad:?}");
        }
        assert!(matches!(store.issue(FIRST_ADMIN, Role::Viewer), Err(TokenError::NameTaken(_))));
    }

    #[test]
    fn a_damaged_store_is_refused_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        store.issue("second", Role::Viewer).unwrap();
        let path = dir.path().join(API_DIR).join(TOKENS_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let damaged = text.replacen(" viewer ", " root ", 1);
        std::fs::write(&path, damaged).unwrap();
        let error = TokenStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(error, TokenError::Corrupt { line: 1..=2, ref reason, .. } if reason == "unknown role"),
            "{error}"
        );
    }
}
