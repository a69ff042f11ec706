//! One-time registration tokens: what they are and how one is judged, and the ones a control
//! plane of its own keeps in memory (control planes sharing a database keep theirs there: see
//! `shared.rs`).
//!
//! A token is `<selector>.<secret>`: the selector (8 random bytes, hex) finds the entry, the
//! secret (32 random bytes, hex) is compared in constant time. Looking the whole token up in a
//! map would compare it byte by byte, and the timing of that would tell an attacker how much of
//! a guess is right; the selector is useless without the secret, so its timing may leak.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use hodei_agent::pki::{constant_time_eq, hex, random_bytes};

use super::{PkiError, Result};

const SELECTOR_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// How long a used or expired token is remembered, so that presenting it again says "replayed"
/// or "expired" rather than "unknown" for a while, without the map growing for ever.
pub(super) const RETENTION: Duration = Duration::from_secs(60 * 60);

/// A fresh token for `worker_id` (already validated), redeemable until `now + ttl`, with its
/// selector and secret.
pub(super) fn mint(
    worker_id: &str,
    now: SystemTime,
    ttl: Duration,
) -> Result<(RegistrationToken, String, String)> {
    let expires_at = now.checked_add(ttl).ok_or(PkiError::TimeOutOfRange("token expiry"))?;
    let selector = hex(&random_bytes::<SELECTOR_BYTES>()?);
    let secret = hex(&random_bytes::<SECRET_BYTES>()?);
    let token = RegistrationToken {
        token: format!("{selector}.{secret}"),
        worker_id: worker_id.to_owned(),
        expires_at,
    };
    Ok((token, selector, secret))
}

/// What is known of the token a selector names, to judge a presentation of it.
pub(super) struct Issued<'a> {
    /// Whether the secret presented is the token's, compared in constant time.
    pub(super) secret_matches: bool,
    pub(super) used: bool,
    pub(super) expires_at: SystemTime,
    pub(super) worker_id: &'a str,
}

/// Whether `issued` may be redeemed by `worker_id` at `now`, or why not.
///
/// A wrong secret is reported as unknown, like a selector never issued, so that the answer
/// tells a guesser nothing. A token presented for the wrong worker is not consumed: the worker
/// it is bound to can still use it.
pub(super) fn judge(issued: &Issued<'_>, worker_id: &str, now: SystemTime) -> Result<()> {
    if !issued.secret_matches {
        return Err(PkiError::UnknownToken);
    }
    if issued.used {
        tracing::warn!(worker = %issued.worker_id, "a used registration token was presented again");
        return Err(PkiError::TokenReplayed);
    }
    if now >= issued.expires_at {
        return Err(PkiError::TokenExpired);
    }
    if issued.worker_id != worker_id {
        tracing::warn!(bound = %issued.worker_id, claimed = worker_id, "registration token used for another worker");
        return Err(PkiError::TokenWrongWorker { claimed: worker_id.to_owned() });
    }
    Ok(())
}

/// A registration token as issued, to hand to the worker out of band.
#[derive(Clone)]
pub struct RegistrationToken {
    token: String,
    worker_id: String,
    expires_at: SystemTime,
}

impl fmt::Debug for RegistrationToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let selector = self.token.split('.').next().unwrap_or_default();
        f.debug_struct("RegistrationToken")
            .field("selector", &selector)
            .field("worker_id", &self.worker_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl RegistrationToken {
    /// The token itself. It is a secret: it is not `Display`, and `Debug` leaves it out.
    pub fn as_str(&self) -> &str {
        &self.token
    }

    /// The worker it is bound to.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// When it stops being accepted.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

struct Entry {
    secret: String,
    worker_id: String,
    expires_at: SystemTime,
    used: bool,
}

/// The outstanding tokens, by selector.
#[derive(Default)]
pub(super) struct RegistrationTokens {
    entries: Mutex<HashMap<String, Entry>>,
}

impl fmt::Debug for RegistrationTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.entries.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("RegistrationTokens").field("remembered", &count).finish()
    }
}

impl RegistrationTokens {
    /// A new token for `worker_id` (already validated), redeemable until `now + ttl`.
    pub(super) fn issue(&self, worker_id: &str, now: SystemTime, ttl: Duration) -> Result<RegistrationToken> {
        let (token, selector, secret) = mint(worker_id, now, ttl)?;
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        forget_old(&mut entries, now);
        let entry =
            Entry { secret, worker_id: worker_id.to_owned(), expires_at: token.expires_at, used: false };
        entries.insert(selector, entry);
        Ok(token)
    }

    /// Consumes `token` for `worker_id`, or says why not (see [`judge`]).
    pub(super) fn redeem(&self, token: &str, worker_id: &str, now: SystemTime) -> Result<()> {
        let (selector, secret) = token.split_once('.').ok_or(PkiError::UnknownToken)?;
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        forget_old(&mut entries, now);
        let entry = entries.get_mut(selector).ok_or(PkiError::UnknownToken)?;
        let issued = Issued {
            secret_matches: constant_time_eq(secret.as_bytes(), entry.secret.as_bytes()),
            used: entry.used,
            expires_at: entry.expires_at,
            worker_id: &entry.worker_id,
        };
        judge(&issued, worker_id, now)?;
        entry.used = true;
        Ok(())
    }
}

fn forget_old(entries: &mut HashMap<String, Entry>, now: SystemTime) {
    entries.retain(|_, entry| entry.expires_at.checked_add(RETENTION).is_none_or(|until| until > now));
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn a_token_is_redeemed_once() {
        let tokens = RegistrationTokens::default();
        let now = SystemTime::now();
        let token = tokens.issue("w-1", now, TTL).unwrap();
        tokens.redeem(token.as_str(), "w-1", now).unwrap();
        assert!(matches!(tokens.redeem(token.as_str(), "w-1", now), Err(PkiError::TokenReplayed)));
    }

    #[test]
    fn every_rejection_has_its_own_error() {
        let tokens = RegistrationTokens::default();
        let now = SystemTime::now();
        let token = tokens.issue("w-1", now, TTL).unwrap();
        let (selector, secret) = token.as_str().split_once('.').unwrap();

        let wrong_secret = format!("{selector}.{}", "0".repeat(secret.len()));
        for unknown in ["", "no-dot", "abc.def", &wrong_secret, &format!("{selector}.")] {
            assert!(matches!(tokens.redeem(unknown, "w-1", now), Err(PkiError::UnknownToken)), "{unknown:?}");
        }
        assert!(matches!(
            tokens.redeem(token.as_str(), "w-2", now),
            Err(PkiError::TokenWrongWorker { ref claimed }) if claimed == "w-2"
        ));
        assert!(matches!(tokens.redeem(token.as_str(), "w-1", now + TTL), Err(PkiError::TokenExpired)));
        // None of the failures consumed it.
        tokens.redeem(token.as_str(), "w-1", now).unwrap();
    }

    #[test]
    fn old_tokens_are_forgotten() {
        let tokens = RegistrationTokens::default();
        let now = SystemTime::now();
        let token = tokens.issue("w-1", now, TTL).unwrap();
        let later = now + TTL + RETENTION;
        assert!(matches!(tokens.redeem(token.as_str(), "w-1", later), Err(PkiError::UnknownToken)));
        assert!(tokens.entries.lock().unwrap().is_empty());
    }

    #[test]
    fn tokens_are_random_and_debug_hides_the_secret() {
        let tokens = RegistrationTokens::default();
        let now = SystemTime::now();
        let a = tokens.issue("w-1", now, TTL).unwrap();
        let b = tokens.issue("w-1", now, TTL).unwrap();
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.as_str().len(), 2 * (SELECTOR_BYTES + SECRET_BYTES) + 1);
        let secret = a.as_str().split_once('.').unwrap().1;
        assert!(!format!("{a:?}").contains(secret));
        assert!(matches!(tokens.issue("w-1", now, Duration::MAX), Err(PkiError::TimeOutOfRange(_))));
    }
}
