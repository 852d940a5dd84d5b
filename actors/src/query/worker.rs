//! A query worker: one of the dispatcher's pool. Each holds its own HTTP client to Cube, signs
//! the security-context token for the job's project and sends one request upstream at a time.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

use ractor::factory::{FactoryMessage, Job, Worker, WorkerId};
use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Deserialize;
use tracing::{debug, warn};

use super::{CubeRequest, CubeResponse, QueryError};
use crate::settings::CubeSettings;
use crate::signer::Signer;

/// Cube has answered and the body is not yet known to be data; bodies of errors are small.
const MAX_ERROR_MESSAGE: usize = 2_000;

/// Idle connections a worker keeps to Cube; it sends one request at a time.
const IDLE_CONNECTIONS: usize = 2;

/// One Cube request and where its answer goes. The reply is an `Option` so that a job the
/// dispatcher sheds can still be answered from the `&mut` the discard handler gets.
pub struct QueryJob {
    pub request: Box<CubeRequest>,
    pub reply: Option<RpcReplyPort<Result<CubeResponse, QueryError>>>,
    /// The instance's place at Cube, given back when the job is done with: answered by Cube,
    /// shed, or dropped with a stopped worker. A caller that hangs up frees none.
    pub place: OwnedSemaphorePermit,
}

impl QueryJob {
    pub fn answer(&mut self, answer: Result<CubeResponse, QueryError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(answer);
        }
    }
}

pub struct CubeWorker;

/// What each new worker (a replacement included) starts from.
#[derive(Clone)]
pub struct CubeWorkerArgs {
    pub cube: Arc<CubeSettings>,
    pub signer: Arc<Signer>,
}

pub struct CubeWorkerState {
    http: reqwest::Client,
    base: Arc<str>,
    signer: Arc<Signer>,
}

impl Worker for CubeWorker {
    type Key = ();
    type Message = QueryJob;
    type Arguments = CubeWorkerArgs;
    type State = CubeWorkerState;

    async fn pre_start(
        &self,
        _wid: WorkerId,
        _factory: &ActorRef<FactoryMessage<(), QueryJob>>,
        args: CubeWorkerArgs,
    ) -> Result<CubeWorkerState, ActorProcessingErr> {
        metrics::counter!("monitor_gateway_query_worker_starts_total").increment(1);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(args.cube.timeout_seconds))
            .pool_max_idle_per_host(IDLE_CONNECTIONS)
            .tcp_nodelay(true)
            .build()?;
        Ok(CubeWorkerState {
            http,
            base: args.cube.url.trim_end_matches('/').into(),
            signer: args.signer,
        })
    }

    async fn handle(
        &self,
        _wid: WorkerId,
        _factory: &ActorRef<FactoryMessage<(), QueryJob>>,
        Job { key, msg, .. }: Job<(), QueryJob>,
        state: &mut CubeWorkerState,
    ) -> Result<(), ActorProcessingErr> {
        let QueryJob {
            request,
            reply,
            place,
        } = msg;
        // The caller gave up while the job waited: asking Cube now would be wasted work.
        let Some(reply) = reply.filter(|reply| !reply.is_closed()) else {
            metrics::counter!("monitor_gateway_queries_abandoned_total").increment(1);
            return Ok(key);
        };
        let answer = state.forward(*request).await;
        drop(place);
        if let Err(QueryError::Upstream(_) | QueryError::Timeout) = &answer {
            metrics::counter!("monitor_gateway_upstream_errors_total", "upstream" => "cube")
                .increment(1);
        }
        let _ = reply.send(answer);
        Ok(key)
    }
}

#[derive(Deserialize)]
struct CubeError {
    error: String,
}

impl CubeWorkerState {
    async fn forward(&self, request: CubeRequest) -> Result<CubeResponse, QueryError> {
        metrics::counter!("monitor_gateway_cube_requests_total", "endpoint" => request.endpoint.as_str())
            .increment(1);
        let token = self
            .signer
            .security_context_token(&request.project)
            .map_err(|err| QueryError::Upstream(err.to_string()))?;

        let mut url = format!("{}/cubejs-api/v1/{}", self.base, request.endpoint.as_str());
        let builder = if request.post {
            self.http
                .post(&url)
                .header("content-type", "application/json")
                .body(request.body)
        } else {
            if let Some(query) = &request.query_string {
                url.push('?');
                url.push_str(query);
            }
            self.http.get(&url)
        };
        let response = builder
            .header("authorization", token.as_ref())
            .header("x-request-id", &request.request_id)
            .send()
            .await
            .map_err(upstream_error)?;

        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.map_err(upstream_error)?;
        debug!(
            status,
            endpoint = request.endpoint.as_str(),
            bytes = body.len(),
            "cube answered"
        );

        match status {
            200..=299 => Ok(CubeResponse {
                status,
                content_type,
                body,
            }),
            400..=500 => Err(classify_error(status, &body)),
            _ => Err(QueryError::Upstream(format!("Cube answered {status}"))),
        }
    }
}

/// Cube reports query mistakes and database errors alike as an `{"error": ...}` body.
fn classify_error(status: u16, body: &[u8]) -> QueryError {
    let message = serde_json::from_slice::<CubeError>(body)
        .map(|err| err.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    let message: String = message.chars().take(MAX_ERROR_MESSAGE).collect();

    if status == 401 || status == 403 {
        warn!(status, %message, "Cube refused the gateway's security-context token");
        return QueryError::Upstream("Cube refused the gateway's credentials".to_owned());
    }
    // Cube could not reach ClickHouse: an outage, not a mistake in the query.
    const CONNECTION_ERRORS: [&str; 6] = [
        "ECONNREFUSED",
        "ECONNRESET",
        "ETIMEDOUT",
        "EHOSTUNREACH",
        "socket hang up",
        "getaddrinfo",
    ];
    if CONNECTION_ERRORS
        .iter()
        .any(|marker| message.contains(marker))
    {
        warn!(status, %message, "Cube cannot reach ClickHouse");
        return QueryError::Upstream("Cube cannot reach the analytics store".to_owned());
    }
    // ClickHouse: "Database gitlab_project_... doesn't exist" (code 81) or a missing table (60).
    if message.contains("doesn't exist") && message.contains("gitlab_project_") {
        return QueryError::ProjectMissing;
    }
    QueryError::InvalidQuery(message)
}

fn upstream_error(err: reqwest::Error) -> QueryError {
    if err.is_timeout() {
        QueryError::Timeout
    } else {
        QueryError::Upstream(err.without_url().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cube_errors_are_classified() {
        let missing = br#"{"error":"Error: Code: 81, e.displayText() = DB::Exception: Database gitlab_project_abc doesn't exist"}"#;
        assert!(matches!(
            classify_error(400, missing),
            QueryError::ProjectMissing
        ));
        let unknown = br#"{"error":"Error: 'Nope' cube not found"}"#;
        assert!(
            matches!(classify_error(400, unknown), QueryError::InvalidQuery(m) if m.contains("Nope"))
        );
        assert!(matches!(
            classify_error(403, br#"{"error":"Invalid token"}"#),
            QueryError::Upstream(_)
        ));
        let refused = br#"{"error":"Error: connect ECONNREFUSED 127.0.0.1:38123"}"#;
        assert!(
            matches!(classify_error(400, refused), QueryError::Upstream(m) if !m.contains("127.0.0.1"))
        );
    }
}
