//! The names of a worker's objects and the values of their labels, made valid for Kubernetes:
//! derived from the worker id alone, so that another process finds them again.

/// The prefix of every worker pod's name.
pub const POD_PREFIX: &str = "hodei-";
/// The suffix of every worker's CA ConfigMap name, after its pod's name.
pub const CONFIG_MAP_SUFFIX: &str = "-ca";

/// The longest label value, and the longest DNS-1123 label (our object names).
pub(super) const MAX_LABEL: usize = 63;
/// A sanitized name or value ends with `-` and eight hex digits of the original's hash.
const HASH_SUFFIX_LEN: usize = 9;

/// The name of the pod of `worker_id`: `hodei-<worker id>` when the id is a valid DNS label,
/// else a sanitized form with a hash of the id, so that distinct ids never share a pod.
pub fn pod_name(worker_id: &str) -> String {
    let stem_room = MAX_LABEL - POD_PREFIX.len() - CONFIG_MAP_SUFFIX.len();
    format!("{POD_PREFIX}{}", dns_label(worker_id, stem_room))
}

/// The name of the CA ConfigMap of `worker_id`.
pub fn config_map_name(worker_id: &str) -> String {
    format!("{}{CONFIG_MAP_SUFFIX}", pod_name(worker_id))
}

/// `value` if it is a valid label value, else a valid one made of its allowed characters and a
/// hash of it.
pub fn label_value(value: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if is_label_value(value) {
        return value.to_owned();
    }
    let cleaned: String = value.chars().map(|c| if allowed(c) { c } else { '-' }).collect();
    with_hash(&cleaned, value, MAX_LABEL, |c| c.is_ascii_alphanumeric())
}

pub(super) fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_label_name(value)
}

/// A label key's name part, or a non-empty label value: at most 63 of `[A-Za-z0-9._-]`, starting
/// and ending alphanumeric.
fn is_label_name(text: &str) -> bool {
    text.len() <= MAX_LABEL
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric())
        && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name.
pub(super) fn is_label_key(key: &str) -> bool {
    match key.rsplit_once('/') {
        None => is_label_name(key),
        Some((prefix, name)) => {
            is_label_name(name)
                && prefix.len() <= 253
                && prefix.split('.').all(|part| is_dns_label(part, MAX_LABEL))
        }
    }
}

pub(super) fn is_dns_label(text: &str, max: usize) -> bool {
    text.len() <= max
        && text.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && text.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// `text` if it is a DNS label of at most `max` characters, else a sanitized one with a hash.
fn dns_label(text: &str, max: usize) -> String {
    if is_dns_label(text, max) {
        return text.to_owned();
    }
    let cleaned: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    with_hash(&cleaned, text, max, |c| c.is_ascii_alphanumeric())
}

/// `cleaned`, cut to leave room for the hash and trimmed to start and end with a character
/// `edge` accepts, then `-` and the hash of `original`.
fn with_hash(cleaned: &str, original: &str, max: usize, edge: impl Fn(char) -> bool + Copy) -> String {
    let hash = format!("{:08x}", fnv1a(original));
    let cut: String = cleaned.chars().take(max - HASH_SUFFIX_LEN).collect();
    let trimmed = cut.trim_matches(|c: char| !edge(c));
    if trimmed.is_empty() { hash } else { format!("{trimmed}-{hash}") }
}

/// 32-bit FNV-1a: stable across Rust releases and platforms, unlike `DefaultHasher`, which
/// matters because names derived from it must be found again by another process.
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_label_values_are_valid_and_distinct() {
        assert_eq!(pod_name("w-1"), "hodei-w-1");
        assert_eq!(config_map_name("w-1"), "hodei-w-1-ca");
        let upper = pod_name("W-1");
        assert!(is_dns_label(&upper, MAX_LABEL), "{upper}");
        assert_ne!(upper, pod_name("w-1"), "case must not collide");
        let long = "x".repeat(200);
        for name in [pod_name(&long), config_map_name(&long), pod_name("ünïcode/id"), pod_name("---")] {
            assert!(is_dns_label(&name, MAX_LABEL), "{name}");
        }
        assert_eq!(label_value("saga-42"), "saga-42");
        assert_eq!(label_value(""), "");
        for value in ["saga/with spaces", &long, "-leading", "trailing.", "ü"] {
            let valid = label_value(value);
            assert!(is_label_value(&valid), "{value} -> {valid}");
            assert_ne!(valid, value);
        }
        assert_ne!(label_value("a b"), label_value("a/b"), "sanitized values keep a hash of the original");
        assert!(is_label_key("hodei.dev/worker-id"));
        assert!(is_label_key("team"));
        assert!(!is_label_key("Bad_Prefix/x"));
        assert!(!is_label_key("has space"));
    }
}
