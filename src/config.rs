//! Configuration: `config/default.toml` (built in), then the file given with `--config`, then
//! `MONITOR_GATEWAY__SECTION__KEY` environment variables; validated before anything starts.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use actors::auth::parse_algorithms;
use actors::settings::{
    AuthSettings, ClickHouseSettings, CubeSettings, SigningSettings, TenantSettings,
};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");
pub const ENV_PREFIX: &str = "MONITOR_GATEWAY__";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub log: LogSettings,
    pub auth: AuthSettings,
    pub clickhouse: ClickHouseSettings,
    pub cube: CubeSettings,
    pub signing: SigningSettings,
    pub tenants: TenantSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: String,
    pub admin_listen: String,
    pub public_url: String,
    pub max_body_bytes: usize,
    pub request_timeout_seconds: u64,
    pub shutdown_grace_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a `source`, so the message is printed once.
    #[error("invalid configuration: {}", describe(.0))]
    Load(Box<figment::Error>),
    #[error("invalid configuration: {key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("configuration file {0} does not exist")]
    MissingFile(String),
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        Self::Load(Box::new(err))
    }
}

/// Figment's own message names keys with its profile in front ("default.server.listen"), which
/// reads as if the key were the built-in default's: say the key and where it came from.
fn describe(err: &figment::Error) -> String {
    let mut text = err.kind.to_string();
    if !err.path.is_empty() {
        text.push_str(&format!(" for key \"{}\"", err.path.join(".")));
    }
    if let Some(metadata) = &err.metadata {
        match &metadata.source {
            Some(source) => text.push_str(&format!(" in {source}")),
            None => text.push_str(&format!(" in {}", metadata.name)),
        }
    }
    text
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Settings {
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_CONFIG));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::MissingFile(file.display().to_string()));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));

        let settings: Settings = figment.extract()?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn listen(&self) -> SocketAddr {
        self.server.listen.parse().expect("validated")
    }

    pub fn admin_listen(&self) -> SocketAddr {
        self.server.admin_listen.parse().expect("validated")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("server.listen", &self.server.listen),
            ("server.admin_listen", &self.server.admin_listen),
        ] {
            value
                .parse::<SocketAddr>()
                .map_err(|_| invalid(key, format!("{value:?} is not an address:port")))?;
        }
        for (key, value) in [
            ("server.public_url", &self.server.public_url),
            ("clickhouse.url", &self.clickhouse.url),
            ("cube.url", &self.cube.url),
        ] {
            check_http_url(key, value)?;
        }
        let positive = [
            ("server.max_body_bytes", self.server.max_body_bytes as u64),
            (
                "server.request_timeout_seconds",
                self.server.request_timeout_seconds,
            ),
            (
                "clickhouse.timeout_seconds",
                self.clickhouse.timeout_seconds,
            ),
            (
                "clickhouse.idle_connection_seconds",
                self.clickhouse.idle_connection_seconds,
            ),
            ("cube.timeout_seconds", self.cube.timeout_seconds),
            (
                "cube.queue_timeout_seconds",
                self.cube.queue_timeout_seconds,
            ),
            (
                "cube.max_concurrent_queries",
                self.cube.max_concurrent_queries as u64,
            ),
            (
                "tenants.call_timeout_seconds",
                self.tenants.call_timeout_seconds,
            ),
            ("tenants.max_projects", self.tenants.max_projects as u64),
            (
                "tenants.idle_timeout_seconds",
                self.tenants.idle_timeout_seconds,
            ),
            (
                "tenants.purge_interval_seconds",
                self.tenants.purge_interval_seconds,
            ),
            ("tenants.query_burst", u64::from(self.tenants.query_burst)),
            (
                "tenants.max_concurrent_queries",
                u64::from(self.tenants.max_concurrent_queries),
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(invalid(*key, "must be positive"));
        }
        let rate = self.tenants.query_rate_per_second;
        if !(rate.is_finite() && rate > 0.0) {
            return Err(invalid(
                "tenants.query_rate_per_second",
                "must be a positive number",
            ));
        }
        if !is_identifier(&self.clickhouse.database) {
            return Err(invalid(
                "clickhouse.database",
                "must match [a-z_][a-z0-9_]*",
            ));
        }
        // Every onboarding may wait this long; beyond a second it only slows them down.
        if self.clickhouse.registry_batch_wait_ms > 1_000 {
            return Err(invalid(
                "clickhouse.registry_batch_wait_ms",
                "must be at most 1000",
            ));
        }
        if self.cube.result_cache_seconds > 10 {
            return Err(invalid(
                "cube.result_cache_seconds",
                "must be at most 10, Cube's own refresh interval",
            ));
        }
        if self.cube.stuck_worker_seconds <= self.cube.timeout_seconds {
            return Err(invalid(
                "cube.stuck_worker_seconds",
                "must be longer than cube.timeout_seconds",
            ));
        }
        if self.cube.token_ttl_seconds < 10 {
            return Err(invalid("cube.token_ttl_seconds", "must be at least 10"));
        }
        if !(0.0..=1.0).contains(&self.auth.key_refresh.jitter) {
            return Err(invalid(
                "auth.key_refresh.jitter",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.auth.key_refresh.interval_seconds == 0
            || self.auth.key_refresh.fetch_timeout_seconds == 0
        {
            return Err(invalid(
                "auth.key_refresh",
                "intervals and timeouts must be positive",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|err| invalid("log.level", err.to_string()))?;
        self.validate_issuers()
    }

    fn validate_issuers(&self) -> Result<(), ConfigError> {
        if self.auth.issuers.is_empty() {
            return Err(invalid("auth.issuers", "at least one issuer is required"));
        }
        let mut names = HashSet::new();
        let mut issuers = HashSet::new();
        for (i, issuer) in self.auth.issuers.iter().enumerate() {
            let key = |field: &str| format!("auth.issuers[{i}].{field}");
            if issuer.name.is_empty() || !names.insert(&issuer.name) {
                return Err(invalid(key("name"), "must be present and unique"));
            }
            if issuer.issuer.is_empty() || !issuers.insert(&issuer.issuer) {
                return Err(invalid(key("issuer"), "must be present and unique"));
            }
            match (&issuer.jwks_url, &issuer.discovery_url) {
                (Some(url), None) => check_http_url(&key("jwks_url"), url)?,
                (None, Some(url)) => check_http_url(&key("discovery_url"), url)?,
                _ => {
                    return Err(invalid(
                        key("jwks_url"),
                        "set exactly one of jwks_url and discovery_url",
                    ));
                }
            }
            if issuer.algorithms.is_empty() {
                return Err(invalid(
                    key("algorithms"),
                    "at least one algorithm is required",
                ));
            }
            parse_algorithms(&issuer.algorithms)
                .map_err(|reason| invalid(key("algorithms"), reason))?;
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets replaced.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.clickhouse.password.is_empty() {
            shown.clickhouse.password = "<redacted>".to_owned();
        }
        toml::to_string_pretty(&shown).expect("settings always serialise")
    }
}

fn check_http_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = value
        .parse()
        .map_err(|_| invalid(key, format!("{value:?} is not a URL")))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(()),
        _ => Err(invalid(
            key,
            format!("{value:?} must be an http(s) URL with a host"),
        )),
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_validate() {
        let settings = Settings::load(None).unwrap();
        assert_eq!(settings.server.listen, "127.0.0.1:8080");
        assert_eq!(settings.auth.audience, "gitlab-monitor-gateway");
        assert_eq!(settings.auth.leeway_seconds, 60);
        assert_eq!(settings.auth.issuers.len(), 2);
        assert_eq!(settings.clickhouse.database, "monitor_gateway");
    }

    #[test]
    fn a_file_overrides_defaults_and_bad_values_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:1234\"\n").unwrap();
        assert_eq!(
            Settings::load(Some(&path)).unwrap().server.listen,
            "127.0.0.1:1234"
        );

        std::fs::write(&path, "[server]\nlisten = \"nowhere\"\n").unwrap();
        let err = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("server.listen"), "{err}");

        std::fs::write(&path, "[clickhouse]\ndatabase = \"x; DROP\"\n").unwrap();
        assert!(
            Settings::load(Some(&path))
                .unwrap_err()
                .to_string()
                .contains("clickhouse.database")
        );

        std::fs::write(
            &path,
            "[[auth.issuers]]\nname = \"a\"\nissuer = \"https://a\"\n",
        )
        .unwrap();
        assert!(
            Settings::load(Some(&path))
                .unwrap_err()
                .to_string()
                .contains("auth.issuers[0].jwks_url")
        );

        std::fs::write(&path, "[tenants]\nquery_rate_per_second = -1.0\n").unwrap();
        assert!(
            Settings::load(Some(&path))
                .unwrap_err()
                .to_string()
                .contains("query_rate")
        );
        std::fs::write(&path, "[clickhouse]\nregistry_batch_wait_ms = 5000\n").unwrap();
        assert!(
            Settings::load(Some(&path))
                .unwrap_err()
                .to_string()
                .contains("registry_batch_wait_ms")
        );
        std::fs::write(&path, "[tenants]\ncall_timeout_seconds = 0\n").unwrap();
        assert!(
            Settings::load(Some(&path))
                .unwrap_err()
                .to_string()
                .contains("call_timeout")
        );

        std::fs::write(&path, "[server]\nlisten_typo = 1\n").unwrap();
        assert!(
            Settings::load(Some(&path))
                .unwrap_err()
                .to_string()
                .contains("listen_typo")
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let mut settings = Settings::load(None).unwrap();
        settings.clickhouse.password = "hunter2".to_owned();
        let shown = settings.redacted_toml();
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("<redacted>"));
    }
}
