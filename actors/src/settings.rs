//! Settings the actors need. Loading, layering and validation happen in the binary; every value
//! has its documented default in `config/default.toml`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Must be contained in every token's `aud`.
    pub audience: String,
    /// The unit primitive a token's `scopes` must carry for product analytics.
    pub scope: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway_seconds: u64,
    /// Tokens longer than this are refused before any parsing.
    pub max_token_bytes: usize,
    /// Verified tokens kept, so the hot path skips RSA verification; 0 turns the cache off.
    pub token_cache_capacity: u64,
    pub issuers: Vec<IssuerSettings>,
    pub key_refresh: KeyRefreshSettings,
}

impl AuthSettings {
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.leeway_seconds)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSettings {
    /// A short name used in logs and metric labels.
    pub name: String,
    /// The exact `iss` claim of this issuer's tokens.
    pub issuer: String,
    /// The JWKS document itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// An OIDC discovery document whose `jwks_uri` names the JWKS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery_url: Option<String>,
    /// Signature algorithms accepted from this issuer (RSA family only).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".to_owned()]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRefreshSettings {
    /// Regular refresh period of each issuer's key set (jitter is added).
    pub interval_seconds: u64,
    /// Fraction of the interval added or removed at random, 0.0 to 1.0.
    pub jitter: f64,
    /// Shortest time between two fetches caused by tokens naming an unknown `kid`.
    pub unknown_kid_min_interval_seconds: u64,
    /// Retry period while an issuer has never answered with a usable key set.
    pub retry_seconds: u64,
    /// Timeout of one JWKS or discovery request.
    pub fetch_timeout_seconds: u64,
    /// Retries of a fetch that failed on the network or with a 5xx, with exponential backoff.
    pub fetch_retries: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseSettings {
    pub url: String,
    pub user: String,
    pub password: String,
    /// The gateway's own database, holding the registry.
    pub database: String,
    pub timeout_seconds: u64,
    /// How long an idle connection is kept for reuse; below the server's `keep_alive_timeout`.
    pub idle_connection_seconds: u64,
    /// How long a registry write someone waits for waits for others to share its INSERT, beyond
    /// the rows queued while the previous one ran (0: not at all).
    pub registry_batch_wait_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CubeSettings {
    pub url: String,
    /// Deadline of one upstream Cube request.
    pub timeout_seconds: u64,
    /// `iss` of the tokens the gateway signs for Cube (`CUBEJS_JWT_ISSUER`).
    pub token_issuer: String,
    /// `aud` of the tokens the gateway signs for Cube (`CUBEJS_JWT_AUDIENCE`).
    pub token_audience: String,
    /// Lifetime of a security-context token.
    pub token_ttl_seconds: u64,
    /// Cube requests in flight at most; more wait in the queue.
    pub max_concurrent_queries: usize,
    /// Cube requests waiting at most; beyond it they are refused with 503 overloaded.
    pub max_queued_queries: usize,
    /// How long a request may wait for a free worker before it is refused with 503 overloaded.
    pub queue_timeout_seconds: u64,
    /// A worker busy with one request for this long is stuck: it is killed and replaced.
    /// Longer than `timeout_seconds`, which bounds every healthy request.
    pub stuck_worker_seconds: u64,
    /// How long an answer to `load` or `meta` is reused for identical requests of the same
    /// tenant; 0 turns the result cache off. At most Cube's own refresh interval (10 s).
    pub result_cache_seconds: u64,
    /// Answers kept at most.
    pub result_cache_capacity: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningSettings {
    /// PKCS#8 PEM file with the RSA key that signs security-context tokens.
    pub key_file: String,
    /// Generate the key file when it does not exist (convenient locally; production mounts one).
    pub create_if_missing: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Deadline for one message to a tenant actor, ClickHouse DDL included.
    pub call_timeout_seconds: u64,
    /// Most projects an instance may have ready or provisioning at once.
    pub max_projects: usize,
    /// A tenant actor with no request for this long stops; the next request starts it again.
    pub idle_timeout_seconds: u64,
    /// How long a deprovisioned project's data is kept; onboarding again within it restores it.
    pub deprovision_grace_seconds: u64,
    /// How often the purge looks for deprovisioned projects past their grace period.
    pub purge_interval_seconds: u64,
    /// How often running tenant actors learn the changes other gateways made to the registry;
    /// 0 when this gateway is the registry's only writer.
    pub refresh_seconds: u64,
    /// Queries an instance may send per second, on average (a token bucket per instance).
    pub query_rate_per_second: f64,
    /// Queries an instance may send at once above that rate.
    pub query_burst: u32,
    /// Queries of one instance in flight at once (queued or at Cube); beyond it, 429.
    pub max_concurrent_queries: u32,
}
