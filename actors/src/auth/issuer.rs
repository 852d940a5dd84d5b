//! The key-set actor of one token issuer: fetches its JWKS at start, refreshes it on a timer and
//! on demand, and publishes the last good key set for verification to read without messaging.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{ExponentialBuilder, Retryable};
use jsonwebtoken::Algorithm;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::Rng;
use serde::Deserialize;
use tracing::{debug, info, warn};

use super::key_set::{KeySet, KeySetError};
use crate::settings::{IssuerSettings, KeyRefreshSettings};

/// Largest JWKS or discovery document accepted from an issuer.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// What verification needs of an issuer: its identity and its current key set.
pub struct IssuerKeys {
    pub name: String,
    pub issuer: String,
    pub algorithms: Vec<Algorithm>,
    current: RwLock<Option<Arc<KeySet>>>,
}

impl IssuerKeys {
    pub fn new(name: String, issuer: String, algorithms: Vec<Algorithm>) -> Self {
        Self {
            name,
            issuer,
            algorithms,
            current: RwLock::new(None),
        }
    }

    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(super) fn publish(&self, set: KeySet) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(set));
    }

    /// The registry name of this issuer's key-set actor.
    pub fn actor_name(&self) -> String {
        format!("jwks:{}", self.name)
    }
}

pub enum IssuerMsg {
    /// Fetch now and schedule the next periodic refresh.
    Refresh,
    /// A token named a `kid` we do not hold: fetch at once unless we fetched very recently.
    RefreshForUnknownKid(RpcReplyPort<()>),
    /// The fetch an unknown `kid` asked for while fetches were rate-limited.
    DeferredRefresh,
}

pub struct IssuerActor;

pub struct IssuerArgs {
    pub keys: Arc<IssuerKeys>,
    pub settings: IssuerSettings,
    pub refresh: KeyRefreshSettings,
}

pub struct IssuerState {
    keys: Arc<IssuerKeys>,
    settings: IssuerSettings,
    refresh: KeyRefreshSettings,
    http: reqwest::Client,
    last_fetch: Option<Instant>,
    deferred: bool,
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request to {url} failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{url} sent a document larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge { url: String },
    #[error("discovery document at {url} has no jwks_uri")]
    NoJwksUri { url: String },
    #[error(transparent)]
    KeySet(#[from] KeySetError),
}

impl FetchError {
    fn is_transient(&self) -> bool {
        match self {
            Self::Http { .. } => true,
            Self::Status { status, .. } => status.is_server_error() || status.as_u16() == 429,
            _ => false,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Http { source, .. } if source.is_timeout() => "timeout",
            Self::Http { .. } => "unreachable",
            Self::Status { .. } => "bad_status",
            Self::TooLarge { .. } => "too_large",
            Self::NoJwksUri { .. } => "bad_discovery",
            Self::KeySet(KeySetError::NotJwks(_)) => "malformed",
            Self::KeySet(KeySetError::NoUsableKeys { .. }) => "empty",
        }
    }
}

impl Actor for IssuerActor {
    type Msg = IssuerMsg;
    type State = IssuerState;
    type Arguments = IssuerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<IssuerMsg>,
        args: IssuerArgs,
    ) -> Result<IssuerState, ActorProcessingErr> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(args.refresh.fetch_timeout_seconds))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()?;
        myself.send_message(IssuerMsg::Refresh)?;
        Ok(IssuerState {
            keys: args.keys,
            settings: args.settings,
            refresh: args.refresh,
            http,
            last_fetch: None,
            deferred: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<IssuerMsg>,
        message: IssuerMsg,
        state: &mut IssuerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            IssuerMsg::Refresh => {
                let next = if state.refresh_now("scheduled").await {
                    state.next_periodic_refresh()
                } else {
                    state.next_retry()
                };
                myself.send_after(next, || IssuerMsg::Refresh);
            }
            IssuerMsg::RefreshForUnknownKid(reply) => {
                let min_interval =
                    Duration::from_secs(state.refresh.unknown_kid_min_interval_seconds);
                match state.last_fetch.map(|at| at.elapsed()) {
                    Some(elapsed) if elapsed < min_interval => {
                        // Rate-limited: one fetch when the window ends serves every such token.
                        metrics::counter!("monitor_gateway_jwks_refresh_suppressed_total",
                            "issuer" => state.keys.name.clone())
                        .increment(1);
                        if !state.deferred {
                            state.deferred = true;
                            myself
                                .send_after(min_interval - elapsed, || IssuerMsg::DeferredRefresh);
                        }
                    }
                    _ => {
                        state.refresh_now("unknown_kid").await;
                    }
                }
                let _ = reply.send(());
            }
            IssuerMsg::DeferredRefresh => {
                state.deferred = false;
                state.refresh_now("unknown_kid").await;
            }
        }
        Ok(())
    }
}

impl IssuerState {
    /// Fetches the key set and publishes it when usable; the previous set stays otherwise.
    async fn refresh_now(&mut self, trigger: &'static str) -> bool {
        self.last_fetch = Some(Instant::now());
        let issuer = self.keys.name.clone();

        match self.fetch().await {
            Ok(set) => {
                let count = set.len();
                debug!(issuer, trigger, keys = count, "key set refreshed");
                if self.keys.current().is_none() {
                    info!(issuer, keys = count, "first key set loaded");
                }
                self.keys.publish(set);
                metrics::counter!("monitor_gateway_jwks_refresh_total",
                    "issuer" => issuer.clone(), "trigger" => trigger, "outcome" => "ok")
                .increment(1);
                metrics::gauge!("monitor_gateway_jwks_keys", "issuer" => issuer.clone())
                    .set(count as f64);
                metrics::gauge!("monitor_gateway_jwks_last_success_timestamp_seconds", "issuer" => issuer)
                    .set(unix_now());
                true
            }
            Err(err) => {
                let kept = self.keys.current().map_or(0, |set| set.len());
                warn!(issuer, trigger, error = %err, kept_keys = kept, "key set refresh failed");
                metrics::counter!("monitor_gateway_jwks_refresh_total",
                    "issuer" => issuer, "trigger" => trigger, "outcome" => err.reason())
                .increment(1);
                false
            }
        }
    }

    /// One fetch with retries: transient failures (network, timeouts, 5xx) are retried with
    /// exponential backoff; a document that arrived but is unusable is not.
    async fn fetch(&self) -> Result<KeySet, FetchError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(self.refresh.fetch_retries)
            .with_jitter();
        (|| self.fetch_once())
            .retry(backoff)
            .when(FetchError::is_transient)
            .notify(|err, delay| debug!(issuer = self.keys.name, error = %err, ?delay, "retrying key set fetch"))
            .await
    }

    async fn fetch_once(&self) -> Result<KeySet, FetchError> {
        let jwks_url = match (&self.settings.jwks_url, &self.settings.discovery_url) {
            (Some(url), _) => url.clone(),
            (None, Some(discovery)) => self.discover(discovery).await?,
            (None, None) => {
                unreachable!("configuration validation requires a JWKS or discovery URL")
            }
        };
        let body = self.get(&jwks_url).await?;
        Ok(KeySet::from_jwks(&body, &self.keys.algorithms)?)
    }

    async fn discover(&self, url: &str) -> Result<String, FetchError> {
        #[derive(Deserialize)]
        struct Discovery {
            jwks_uri: String,
        }
        let body = self.get(url).await?;
        serde_json::from_slice::<Discovery>(&body)
            .map(|doc| doc.jwks_uri)
            .map_err(|_| FetchError::NoJwksUri {
                url: url.to_owned(),
            })
    }

    async fn get(&self, url: &str) -> Result<bytes::Bytes, FetchError> {
        let http = |source| FetchError::Http {
            url: url.to_owned(),
            source,
        };
        let response = self.http.get(url).send().await.map_err(http)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status,
            });
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(FetchError::TooLarge {
                url: url.to_owned(),
            });
        }
        let body = response.bytes().await.map_err(http)?;
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(FetchError::TooLarge {
                url: url.to_owned(),
            });
        }
        Ok(body)
    }

    fn next_periodic_refresh(&self) -> Duration {
        let base = self.refresh.interval_seconds as f64;
        let jitter = self.refresh.jitter.clamp(0.0, 1.0) * base;
        let seconds = base + rand::thread_rng().gen_range(-jitter..=jitter);
        Duration::from_secs_f64(seconds.max(1.0))
    }

    /// Retry soon while the issuer has never given keys; otherwise the last good set carries on
    /// and the regular schedule resumes.
    fn next_retry(&self) -> Duration {
        if self.keys.current().is_none() {
            Duration::from_secs(self.refresh.retry_seconds.max(1))
        } else {
            self.next_periodic_refresh()
                .min(Duration::from_secs(self.refresh.retry_seconds.max(1) * 10))
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
