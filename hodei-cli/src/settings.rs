//! Where the server is and who we are: flags, then environment, then a profile file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reqwest::Url;
use serde::Deserialize;

use crate::error::{CliError, Result};

pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7433";
pub const DEFAULT_PROFILE: &str = "default";

/// What the command line said about the connection.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub addr: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
    pub profile: Option<String>,
}

/// The connection settings, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub addr: Url,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

/// Strict, so that a misspelt key is an error rather than a setting silently not applied.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    addr: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
}

/// Where things come from; a trait so that tests resolve without touching the process's
/// environment or the disk.
pub trait Sources {
    fn env(&self, name: &str) -> Option<String>;
    /// `Ok(None)` when the file does not exist.
    fn read(&self, path: &Path) -> std::io::Result<Option<String>>;
}

/// The real environment and file system.
#[derive(Debug)]
pub struct System;

impl Sources for System {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    fn read(&self, path: &Path) -> std::io::Result<Option<String>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Resolves each setting from the first source that has it: a flag, then the environment
/// (`HODEI_ADDR`, `HODEI_TOKEN`, `HODEI_TOKEN_FILE`, `HODEI_CA_CERT`), then the profile.
pub fn resolve(flags: &Flags, sources: &impl Sources) -> Result<Settings> {
    let (profile, config_dir) = load_profile(flags, sources)?;
    let home = sources.env("HOME").map(PathBuf::from);
    let from_profile = |path: &Path| resolve_path(path, config_dir.as_deref(), home.as_deref());

    let addr = flags
        .addr
        .clone()
        .or_else(|| sources.env("HODEI_ADDR"))
        .or(profile.addr)
        .unwrap_or_else(|| DEFAULT_ADDR.to_owned());

    // A token and a token file at the same level: the token wins (clap forbids both as flags).
    let token = if let Some(token) = &flags.token {
        Some(token.clone())
    } else if let Some(file) = &flags.token_file {
        Some(read_token_file(file, sources)?)
    } else if let Some(token) = sources.env("HODEI_TOKEN") {
        Some(token)
    } else if let Some(file) = sources.env("HODEI_TOKEN_FILE") {
        Some(read_token_file(Path::new(&file), sources)?)
    } else if let Some(token) = profile.token {
        Some(token)
    } else if let Some(file) = &profile.token_file {
        Some(read_token_file(&from_profile(file), sources)?)
    } else {
        None
    };
    if let Some(token) = &token {
        check_token(token)?;
    }

    let ca_cert = flags
        .ca_cert
        .clone()
        .or_else(|| sources.env("HODEI_CA_CERT").map(PathBuf::from))
        .or_else(|| profile.ca_cert.as_deref().map(from_profile));

    Ok(Settings { addr: parse_addr(&addr)?, token, ca_cert })
}

fn load_profile(flags: &Flags, sources: &impl Sources) -> Result<(Profile, Option<PathBuf>)> {
    let named = flags.profile.clone().or_else(|| sources.env("HODEI_PROFILE"));
    let explicit_file = sources.env("HODEI_CONFIG").map(PathBuf::from);
    let path = match &explicit_file {
        Some(path) => Some(path.clone()),
        None => sources
            .env("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| sources.env("HOME").map(|home| Path::new(&home).join(".config")))
            .map(|dir| dir.join("hodei").join("config.toml")),
    };
    let Some(path) = path else {
        return match named {
            Some(name) => Err(CliError::usage(format!(
                "profile `{name}` asked for, but there is no config file (set HODEI_CONFIG or HOME)"
            ))),
            None => Ok((Profile::default(), None)),
        };
    };
    let text = sources
        .read(&path)
        .map_err(|e| CliError::usage(format!("cannot read the config file {}: {e}", path.display())))?;
    let Some(text) = text else {
        if explicit_file.is_some() || named.is_some() {
            return Err(CliError::usage(format!("no config file at {}", path.display())));
        }
        return Ok((Profile::default(), None));
    };
    let config: ConfigFile = toml::from_str(&text).map_err(|e| {
        CliError::usage(format!("the config file {}: {}", path.display(), one_line(&e.to_string())))
    })?;
    let dir = path.parent().map(Path::to_path_buf);
    match named {
        Some(name) => match config.profiles.get(&name) {
            Some(profile) => Ok((profile.clone(), dir)),
            None => Err(CliError::usage(format!("no profile `{name}` in {}", path.display()))),
        },
        None => Ok((config.profiles.get(DEFAULT_PROFILE).cloned().unwrap_or_default(), dir)),
    }
}

/// A profile's paths: `~/` is the home directory; relative ones are relative to the config
/// file, so that a profile means the same from any working directory.
fn resolve_path(path: &Path, config_dir: Option<&Path>, home: Option<&Path>) -> PathBuf {
    if let (Ok(rest), Some(home)) = (path.strip_prefix("~"), home) {
        return home.join(rest);
    }
    match config_dir {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

fn read_token_file(path: &Path, sources: &impl Sources) -> Result<String> {
    let text = sources
        .read(path)
        .map_err(|e| CliError::usage(format!("cannot read the token file {}: {e}", path.display())))?
        .ok_or_else(|| CliError::usage(format!("no token file at {}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CliError::usage(format!("the token file {} is empty", path.display())));
    }
    Ok(token.to_owned())
}

fn check_token(token: &str) -> Result<()> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CliError::usage("the token must be printable ASCII with no spaces (hodei_...)"));
    }
    Ok(())
}

/// `host:port` means `http://host:port`; the URL may carry a path prefix (a reverse proxy's).
pub fn parse_addr(addr: &str) -> Result<Url> {
    let addr = addr.trim();
    let with_scheme = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let url = Url::parse(&with_scheme)
        .map_err(|e| CliError::usage(format!("the server address `{addr}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(CliError::usage(format!("the server address `{addr}` must be http(s)://host[:port]")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(CliError::usage(format!(
            "the server address `{addr}` must not have a query or fragment"
        )));
    }
    Ok(url)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Fake {
        env: HashMap<&'static str, String>,
        files: HashMap<PathBuf, String>,
    }

    impl Fake {
        fn env(mut self, name: &'static str, value: &str) -> Self {
            self.env.insert(name, value.to_owned());
            self
        }

        fn file(mut self, path: &str, text: &str) -> Self {
            self.files.insert(PathBuf::from(path), text.to_owned());
            self
        }
    }

    impl Sources for Fake {
        fn env(&self, name: &str) -> Option<String> {
            self.env.get(name).cloned()
        }

        fn read(&self, path: &Path) -> std::io::Result<Option<String>> {
            Ok(self.files.get(path).cloned())
        }
    }

    const CONFIG: &str = r#"
[profiles.default]
addr = "https://profile.example:7433"
token = "hodei_profile"
ca_cert = "ca.pem"

[profiles.prod]
addr = "https://prod.example"
token_file = "~/prod-token"
"#;

    fn with_config() -> Fake {
        Fake::default().env("HOME", "/home/op").file("/home/op/.config/hodei/config.toml", CONFIG)
    }

    fn flags() -> Flags {
        Flags::default()
    }

    #[test]
    fn defaults_without_anything() {
        let settings = resolve(&flags(), &Fake::default()).unwrap();
        assert_eq!(settings.addr.as_str(), "http://127.0.0.1:7433/");
        assert_eq!(settings.token, None);
        assert_eq!(settings.ca_cert, None);
    }

    #[test]
    fn the_default_profile_applies_and_its_paths_are_relative_to_the_file() {
        let settings = resolve(&flags(), &with_config()).unwrap();
        assert_eq!(settings.addr.as_str(), "https://profile.example:7433/");
        assert_eq!(settings.token.as_deref(), Some("hodei_profile"));
        assert_eq!(settings.ca_cert, Some(PathBuf::from("/home/op/.config/hodei/ca.pem")));
    }

    #[test]
    fn env_beats_the_profile_and_flags_beat_env() {
        let sources = with_config().env("HODEI_ADDR", "env.example:1").env("HODEI_TOKEN", "hodei_env");
        let settings = resolve(&flags(), &sources).unwrap();
        assert_eq!(settings.addr.as_str(), "http://env.example:1/");
        assert_eq!(settings.token.as_deref(), Some("hodei_env"));

        let flags =
            Flags { addr: Some("https://flag.example".into()), token: Some("hodei_flag".into()), ..flags() };
        let settings = resolve(&flags, &sources).unwrap();
        assert_eq!(settings.addr.as_str(), "https://flag.example/");
        assert_eq!(settings.token.as_deref(), Some("hodei_flag"));
    }

    #[test]
    fn a_token_file_flag_beats_the_token_in_env() {
        let sources =
            with_config().env("HODEI_TOKEN", "hodei_env").file("/data/api/admin-token", "hodei_admin\n");
        let flags = Flags { token_file: Some("/data/api/admin-token".into()), ..flags() };
        assert_eq!(resolve(&flags, &sources).unwrap().token.as_deref(), Some("hodei_admin"));
    }

    #[test]
    fn a_named_profile_with_a_token_file_under_home() {
        let sources = with_config().file("/home/op/prod-token", "  hodei_prod \n");
        let flags = Flags { profile: Some("prod".into()), ..flags() };
        let settings = resolve(&flags, &sources).unwrap();
        assert_eq!(settings.addr.as_str(), "https://prod.example/");
        assert_eq!(settings.token.as_deref(), Some("hodei_prod"));
        assert_eq!(settings.ca_cert, None);
    }

    #[test]
    fn hodei_config_and_hodei_profile_choose_the_file_and_profile() {
        let sources = Fake::default()
            .env("HODEI_CONFIG", "/etc/hodei.toml")
            .env("HODEI_PROFILE", "ci")
            .file("/etc/hodei.toml", "[profiles.ci]\naddr = \"ci.example:9\"\n");
        assert_eq!(resolve(&flags(), &sources).unwrap().addr.as_str(), "http://ci.example:9/");
    }

    #[test]
    fn refusals_are_usage_errors() {
        let missing = Flags { profile: Some("staging".into()), ..flags() };
        let error = resolve(&missing, &with_config()).unwrap_err();
        assert_eq!(error.message, "no profile `staging` in /home/op/.config/hodei/config.toml");
        assert_eq!(error.exit_code(), crate::error::exit::USAGE);

        let typo = Fake::default()
            .env("HOME", "/h")
            .file("/h/.config/hodei/config.toml", "[profiles.default]\nadr = \"x\"\n");
        assert!(resolve(&flags(), &typo).unwrap_err().message.contains("unknown field `adr`"));

        let no_file = Fake::default().env("HODEI_CONFIG", "/nope.toml");
        assert_eq!(resolve(&flags(), &no_file).unwrap_err().message, "no config file at /nope.toml");

        let empty = Fake::default().file("/t", "\n");
        let flags_empty = Flags { token_file: Some("/t".into()), ..flags() };
        assert_eq!(resolve(&flags_empty, &empty).unwrap_err().message, "the token file /t is empty");

        let spaced = Flags { token: Some("hodei_a b".into()), ..flags() };
        assert_eq!(resolve(&spaced, &Fake::default()).unwrap_err().code, "usage");

        for bad in ["ftp://x", "http://", "http://x/?a=1", "::"] {
            assert_eq!(parse_addr(bad).unwrap_err().code, "usage", "{bad}");
        }
    }

    #[test]
    fn addresses_keep_a_path_prefix() {
        assert_eq!(parse_addr("https://proxy.example/hodei").unwrap().path(), "/hodei");
        assert_eq!(parse_addr("localhost:7433").unwrap().as_str(), "http://localhost:7433/");
    }
}
