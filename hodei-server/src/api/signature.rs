//! Webhook signatures in GitHub's form: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the
//! body, keyed with the webhook's secret>`, checked in constant time.

use hodei_agent::pki::unhex;

/// The header GitHub (and Gitea, Forgejo and others that copied it) sends the signature in.
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

const SCHEME: &str = "sha256=";

/// Why a webhook's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The request carries no signature, and the webhook requires one.
    #[error("the request has no {SIGNATURE_HEADER} header")]
    Missing,
    /// The header is not `sha256=` and 64 hex digits.
    #[error("the {SIGNATURE_HEADER} header is not `sha256=` and 64 hex digits")]
    Malformed,
    /// The signature is not the body's HMAC under the webhook's secret.
    #[error("the {SIGNATURE_HEADER} signature does not match the body")]
    Mismatch,
}

/// Checks `header` (the value of [`SIGNATURE_HEADER`], if any) against `body` and `secret`.
/// The comparison takes the same time wherever the signatures differ.
pub fn verify_signature(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let tag = header
        .trim()
        .strip_prefix(SCHEME)
        .and_then(unhex)
        .filter(|tag| tag.len() == 32)
        .ok_or(SignatureError::Malformed)?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &tag).map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's documented example ("Validating webhook deliveries"), also what
    /// `printf 'Hello, World!' | openssl dgst -sha256 -hmac "It's a Secret to Everybody"` prints.
    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";
    const SIGNATURE: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn github_s_test_vector_verifies() {
        assert_eq!(verify_signature(SECRET, BODY, Some(SIGNATURE)), Ok(()));
    }

    #[test]
    fn another_body_or_secret_is_a_mismatch() {
        assert_eq!(
            verify_signature(SECRET, b"Hello, World?", Some(SIGNATURE)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify_signature(b"another secret", BODY, Some(SIGNATURE)), Err(SignatureError::Mismatch));
        let flipped = SIGNATURE.replace("757107", "757108");
        assert_eq!(verify_signature(SECRET, BODY, Some(&flipped)), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_missing_or_malformed_header_is_refused_as_such() {
        assert_eq!(verify_signature(SECRET, BODY, None), Err(SignatureError::Missing));
        let sha1 = "sha1=0123456789abcdef0123456789abcdef01234567";
        let short = &SIGNATURE[..SIGNATURE.len() - 2];
        for header in [
            "",
            "sha256=",
            sha1,
            short,
            "sha256=zz57107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e1",
        ] {
            assert_eq!(
                verify_signature(SECRET, BODY, Some(header)),
                Err(SignatureError::Malformed),
                "{header:?}"
            );
        }
    }
}
