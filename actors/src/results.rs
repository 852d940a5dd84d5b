//! The result cache: identical queries of one tenant within a short window are answered by
//! Cube once and served to every caller, those arriving while Cube works included. The key
//! always holds the tenant key, so tenants never share an answer; "Continue wait" and errors
//! are passed on but never kept.

use std::time::Duration;

use moka::future::Cache;
use sha2::{Digest, Sha256};

use crate::query::{CubeEndpoint, CubeRequest, CubeResponse, QueryError};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    tenant_key: String,
    /// SHA-256 of what the request asks: endpoint, method, query string and body.
    request: [u8; 32],
}

impl CacheKey {
    /// The key of a cacheable request (`load` and `meta`); None for the others.
    pub fn of(request: &CubeRequest) -> Option<Self> {
        if !matches!(request.endpoint, CubeEndpoint::Load | CubeEndpoint::Meta) {
            return None;
        }
        let mut digest = Sha256::new();
        digest.update(request.endpoint.as_str());
        digest.update(if request.post {
            b"\0POST\0"
        } else {
            b"\0GET\0\0"
        });
        digest.update(request.query_string.as_deref().unwrap_or_default());
        digest.update(b"\0");
        digest.update(&request.body);
        Some(Self {
            tenant_key: request.project.tenant_key.to_string(),
            request: digest.finalize().into(),
        })
    }
}

/// What is answered but not kept.
#[derive(Debug)]
enum Uncached {
    Answer(CubeResponse),
    Failed(QueryError),
}

pub struct ResultCache {
    answers: Cache<CacheKey, CubeResponse>,
}

impl ResultCache {
    pub fn new(window: Duration, capacity: u64) -> Self {
        let answers = Cache::builder()
            .max_capacity(capacity)
            .time_to_live(window)
            .build();
        Self { answers }
    }

    /// A kept answer, or one fetch shared by every caller asking for the same key meanwhile.
    pub async fn get_or_fetch(
        &self,
        key: CacheKey,
        fetch: impl Future<Output = Result<CubeResponse, QueryError>>,
    ) -> Result<CubeResponse, QueryError> {
        if let Some(answer) = self.answers.get(&key).await {
            metrics::counter!("monitor_gateway_query_cache_total", "result" => "hit").increment(1);
            return Ok(answer);
        }
        metrics::counter!("monitor_gateway_query_cache_total", "result" => "miss").increment(1);
        let shared = self.answers.try_get_with(key, keep_only_data(fetch)).await;
        shared.or_else(|uncached| match &*uncached {
            Uncached::Answer(answer) => Ok(answer.clone()),
            Uncached::Failed(err) => Err(err.clone()),
        })
    }

    /// Asks Cube regardless of what is kept, and keeps the new answer (the caller's bypass).
    pub async fn refresh(
        &self,
        key: CacheKey,
        fetch: impl Future<Output = Result<CubeResponse, QueryError>>,
    ) -> Result<CubeResponse, QueryError> {
        metrics::counter!("monitor_gateway_query_cache_total", "result" => "bypass").increment(1);
        let answer = fetch.await?;
        if !is_continue_wait(&answer) {
            self.answers.insert(key, answer.clone()).await;
        }
        Ok(answer)
    }
}

async fn keep_only_data(
    fetch: impl Future<Output = Result<CubeResponse, QueryError>>,
) -> Result<CubeResponse, Uncached> {
    match fetch.await {
        Ok(answer) if is_continue_wait(&answer) => Err(Uncached::Answer(answer)),
        Ok(answer) => Ok(answer),
        Err(err) => Err(Uncached::Failed(err)),
    }
}

/// Cube's `{"error": "Continue wait"}`: the query is still running, ask again.
pub fn is_continue_wait(answer: &CubeResponse) -> bool {
    answer.body.len() < 128
        && serde_json::from_slice::<serde_json::Value>(&answer.body)
            .is_ok_and(|body| body["error"] == "Continue wait")
}
