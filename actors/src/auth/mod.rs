//! Authentication of Cloud Connector tokens: which instance is calling, proven by a JWT that an
//! issuer signed with a key from its published JWKS.
//!
//! Verification runs on the caller's task against the key sets the issuer actors publish, so
//! the hot path sends no message; only an unknown `kid` asks the issuer's actor for a refresh.

mod issuer;
mod key_set;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Validation, decode, decode_header};
use moka::sync::Cache;
use ractor::ActorRef;
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use issuer::{IssuerActor, IssuerArgs, IssuerKeys, IssuerMsg};
pub use key_set::{KeySet, KeySetError, VerifyingKey, parse_algorithms};

use crate::code::ErrorCode;
use crate::settings::AuthSettings;
use crate::tenancy::InstanceId;

/// How long a request waits for an issuer refresh caused by an unknown `kid`.
const UNKNOWN_KID_REFRESH_WAIT: Duration = Duration::from_secs(5);

/// The request headers that carry an instance's credentials.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    pub authorization: Option<&'a str>,
    pub instance_id: Option<&'a str>,
    pub realm: Option<&'a str>,
    pub authentication_type: Option<&'a str>,
}

/// A caller whose token and headers checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub instance: InstanceId,
    pub realm: Option<String>,
    pub issuer: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
}

impl AuthError {
    fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What a verified token says, kept in the cache until the token expires.
#[derive(Debug)]
struct VerifiedToken {
    instance: InstanceId,
    realm: Option<String>,
    issuer: String,
    has_scope: bool,
    expires_at: u64,
}

#[derive(Deserialize)]
struct UnverifiedIssuer {
    iss: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    gitlab_instance_uid: Option<String>,
    #[serde(default)]
    gitlab_realm: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

/// Counter handles of the hot path, resolved once instead of on every request.
struct AuthCounters {
    /// Accepted calls, by realm label (the four of `REALMS`).
    accepted: [metrics::Counter; 4],
    cache_hit: metrics::Counter,
    cache_miss: metrics::Counter,
}

const REALMS: [&str; 4] = ["self-managed", "dedicated", "saas", "unknown"];

impl AuthCounters {
    fn new() -> Self {
        let accepted = REALMS.map(|realm| {
            metrics::counter!("monitor_gateway_auth_total", "outcome" => "ok", "realm" => realm)
        });
        Self {
            accepted,
            cache_hit: metrics::counter!("monitor_gateway_auth_token_cache_total", "result" => "hit"),
            cache_miss: metrics::counter!("monitor_gateway_auth_token_cache_total", "result" => "miss"),
        }
    }
}

pub struct Authenticator {
    settings: AuthSettings,
    counters: AuthCounters,
    issuers: HashMap<String, Arc<IssuerKeys>>,
    /// None when the cache is configured off.
    verified: Option<Cache<[u8; 32], Arc<VerifiedToken>>>,
}

struct UntilTokenExpiry;

impl moka::Expiry<[u8; 32], Arc<VerifiedToken>> for UntilTokenExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        token: &Arc<VerifiedToken>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(
            token.expires_at.saturating_sub(unix_now()),
        ))
    }
}

impl Authenticator {
    pub fn new(settings: AuthSettings, issuers: Vec<Arc<IssuerKeys>>) -> Self {
        let verified = (settings.token_cache_capacity > 0).then(|| {
            Cache::builder()
                .max_capacity(settings.token_cache_capacity)
                .expire_after(UntilTokenExpiry)
                .build()
        });
        let issuers = issuers
            .into_iter()
            .map(|keys| (keys.issuer.clone(), keys))
            .collect();
        Self {
            settings,
            counters: AuthCounters::new(),
            issuers,
            verified,
        }
    }

    /// True once at least one issuer has published a key set.
    pub fn has_keys(&self) -> bool {
        self.issuers.values().any(|keys| keys.current().is_some())
    }

    /// Each issuer's name and how many keys it currently has.
    pub fn key_counts(&self) -> Vec<(String, usize)> {
        self.issuers
            .values()
            .map(|keys| (keys.name.clone(), keys.current().map_or(0, |set| set.len())))
            .collect()
    }

    pub async fn authenticate(&self, credentials: &Credentials<'_>) -> Result<Identity, AuthError> {
        let outcome = self.authenticate_inner(credentials).await;
        match &outcome {
            Ok(identity) => {
                let realm = realm_label(identity.realm.as_deref());
                let index = REALMS.iter().position(|known| *known == realm).unwrap_or(3);
                self.counters.accepted[index].increment(1);
            }
            Err(err) => {
                let (outcome, realm) = (err.code.as_str(), realm_label(credentials.realm));
                metrics::counter!("monitor_gateway_auth_total", "outcome" => outcome, "realm" => realm)
                    .increment(1);
            }
        }
        outcome
    }

    async fn authenticate_inner(
        &self,
        credentials: &Credentials<'_>,
    ) -> Result<Identity, AuthError> {
        let token = bearer_token(credentials.authorization, self.settings.max_token_bytes)?;
        let verified = match &self.verified {
            Some(cache) => self.verify_cached(cache, token).await?,
            None => Arc::new(self.verify(token).await?),
        };
        check_headers(&verified, credentials)?;

        if !verified.has_scope {
            return Err(AuthError::new(
                ErrorCode::MissingScope,
                format!(
                    "the token does not grant the {:?} scope",
                    self.settings.scope
                ),
            ));
        }
        Ok(Identity {
            instance: verified.instance.clone(),
            realm: verified.realm.clone(),
            issuer: verified.issuer.clone(),
        })
    }

    /// Looks the token up by its SHA-256; verifies and remembers it when absent or expired.
    async fn verify_cached(
        &self,
        cache: &Cache<[u8; 32], Arc<VerifiedToken>>,
        token: &str,
    ) -> Result<Arc<VerifiedToken>, AuthError> {
        let fingerprint: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = cache
            .get(&fingerprint)
            .filter(|hit| hit.expires_at > unix_now())
        {
            self.counters.cache_hit.increment(1);
            return Ok(hit);
        }
        self.counters.cache_miss.increment(1);
        let fresh = Arc::new(self.verify(token).await?);
        cache.insert(fingerprint, fresh.clone());
        Ok(fresh)
    }

    /// Full verification of a token not seen before: issuer, key, signature and claims.
    async fn verify(&self, token: &str) -> Result<VerifiedToken, AuthError> {
        let malformed = |what: &'static str| AuthError::new(ErrorCode::MalformedToken, what);

        let header = decode_header(token)
            .map_err(|_| malformed("the bearer token is not a well-formed JWT"))?;
        let kid = header
            .kid
            .ok_or_else(|| malformed("the token header has no kid"))?;
        let unverified: UnverifiedIssuer = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| {
            malformed("the token claims are not a JSON object with an iss string")
        })?;

        let issuer = self.issuers.get(&unverified.iss).ok_or_else(|| {
            AuthError::new(
                ErrorCode::UnknownIssuer,
                "the token was issued by an issuer this gateway does not trust",
            )
        })?;
        let key = self.key_for(issuer, &kid).await?;
        if header.alg != key.algorithm {
            return Err(AuthError::new(
                ErrorCode::InvalidSignature,
                "the token is signed with an algorithm its key is not used with",
            ));
        }

        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.settings.leeway_seconds;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.settings.audience]);
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = decode::<Claims>(token, &key.key, &validation)
            .map_err(|err| claim_error(err.kind(), &self.settings.audience))?
            .claims;

        if claims
            .iat
            .is_some_and(|iat| iat > unix_now() + self.settings.leeway_seconds)
        {
            return Err(AuthError::new(
                ErrorCode::TokenNotYetValid,
                "the token was issued in the future (iat)",
            ));
        }
        let instance_claim = claims.gitlab_instance_uid.as_deref().unwrap_or(&claims.sub);
        let instance = InstanceId::parse(instance_claim)
            .map_err(|_| malformed("the token's instance claim is not a UUID"))?;

        Ok(VerifiedToken {
            instance,
            realm: claims.gitlab_realm,
            issuer: issuer.name.clone(),
            has_scope: claims.scopes.contains(&self.settings.scope),
            expires_at: claims.exp.saturating_add(self.settings.leeway_seconds),
        })
    }

    async fn key_for(&self, issuer: &IssuerKeys, kid: &str) -> Result<VerifyingKey, AuthError> {
        let unavailable = || {
            AuthError::new(
                ErrorCode::KeysUnavailable,
                format!(
                    "no signing keys of issuer {:?} could be loaded yet",
                    issuer.name
                ),
            )
        };
        let set = issuer.current().ok_or_else(unavailable)?;
        if let Some(key) = set.get(kid) {
            return Ok(key.clone());
        }

        request_refresh(issuer).await;
        let set = issuer.current().ok_or_else(unavailable)?;
        set.get(kid).cloned().ok_or_else(|| {
            AuthError::new(
                ErrorCode::UnknownKey,
                "the token's kid is not in its issuer's key set",
            )
        })
    }
}

/// Asks the issuer's actor for a refresh; it decides whether one is due. Failure to reach it
/// only means the current key set is used as it is.
async fn request_refresh(issuer: &IssuerKeys) {
    let Some(cell) = ractor::registry::where_is(issuer.actor_name()) else {
        return;
    };
    let actor: ActorRef<IssuerMsg> = cell.into();
    let _ = actor
        .call(
            IssuerMsg::RefreshForUnknownKid,
            Some(UNKNOWN_KID_REFRESH_WAIT),
        )
        .await;
}

fn bearer_token(authorization: Option<&str>, max_bytes: usize) -> Result<&str, AuthError> {
    let missing = || {
        AuthError::new(
            ErrorCode::MissingToken,
            "an Authorization: Bearer token is required",
        )
    };
    let value = authorization.ok_or_else(missing)?;
    if value.len() > max_bytes {
        return Err(AuthError::new(
            ErrorCode::MalformedToken,
            "the Authorization header is too large",
        ));
    }
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::new(
            ErrorCode::MalformedToken,
            "the Authorization header must use the Bearer scheme",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(missing());
    }
    Ok(token)
}

fn check_headers(token: &VerifiedToken, credentials: &Credentials<'_>) -> Result<(), AuthError> {
    let header_instance = credentials.instance_id.map(str::trim).unwrap_or_default();
    if !header_instance.eq_ignore_ascii_case(token.instance.as_str()) {
        return Err(AuthError::new(
            ErrorCode::InstanceMismatch,
            "the X-Gitlab-Instance-Id header must be present and equal the token's instance",
        ));
    }
    if let (Some(header), Some(claim)) = (credentials.realm, token.realm.as_deref())
        && header != claim
    {
        return Err(AuthError::new(
            ErrorCode::RealmMismatch,
            "the X-Gitlab-Realm header does not match the token's realm",
        ));
    }
    if credentials
        .authentication_type
        .is_some_and(|kind| kind != "oidc")
    {
        return Err(AuthError::new(
            ErrorCode::UnsupportedAuthenticationType,
            "X-Gitlab-Authentication-Type must be oidc when present",
        ));
    }
    Ok(())
}

fn claim_error(kind: &ErrorKind, audience: &str) -> AuthError {
    let (code, message): (ErrorCode, Cow<'static, str>) = match kind {
        ErrorKind::InvalidSignature => (
            ErrorCode::InvalidSignature,
            "the token signature does not verify".into(),
        ),
        ErrorKind::InvalidAlgorithm => (
            ErrorCode::InvalidSignature,
            "the token is signed with an algorithm its key is not used with".into(),
        ),
        ErrorKind::ExpiredSignature => (ErrorCode::TokenExpired, "the token has expired".into()),
        ErrorKind::ImmatureSignature => (
            ErrorCode::TokenNotYetValid,
            "the token is not valid yet (nbf)".into(),
        ),
        ErrorKind::InvalidAudience => (
            ErrorCode::WrongAudience,
            format!("the token's audience does not include {audience:?}").into(),
        ),
        ErrorKind::InvalidIssuer => (
            ErrorCode::UnknownIssuer,
            "the token's issuer is not trusted".into(),
        ),
        ErrorKind::MissingRequiredClaim(claim) => (
            ErrorCode::MalformedToken,
            format!("the token has no {claim} claim").into(),
        ),
        _ => (
            ErrorCode::MalformedToken,
            "the token claims are malformed".into(),
        ),
    };
    AuthError::new(code, message)
}

/// Realms as metric labels: the three known ones, everything else folded into "unknown".
fn realm_label(realm: Option<&str>) -> &'static str {
    match realm {
        Some("self-managed") => "self-managed",
        Some("dedicated") => "dedicated",
        Some("saas") => "saas",
        _ => "unknown",
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_required_and_case_insensitive() {
        assert_eq!(bearer_token(Some("Bearer abc"), 100).unwrap(), "abc");
        assert_eq!(bearer_token(Some("bearer abc"), 100).unwrap(), "abc");
        assert_eq!(
            bearer_token(None, 100).unwrap_err().code,
            ErrorCode::MissingToken
        );
        assert_eq!(
            bearer_token(Some("Bearer "), 100).unwrap_err().code,
            ErrorCode::MissingToken
        );
        assert_eq!(
            bearer_token(Some("Bearer"), 100).unwrap_err().code,
            ErrorCode::MissingToken
        );
        assert_eq!(
            bearer_token(Some("Basic abc"), 100).unwrap_err().code,
            ErrorCode::MalformedToken
        );
        assert_eq!(
            bearer_token(Some(&"x".repeat(101)), 100).unwrap_err().code,
            ErrorCode::MalformedToken
        );
    }

    #[test]
    fn realm_labels_are_bounded() {
        assert_eq!(realm_label(Some("saas")), "saas");
        assert_eq!(realm_label(Some("anything the caller sends")), "unknown");
        assert_eq!(realm_label(None), "unknown");
    }
}
