//! The query dispatcher: forwards a project's Cube REST calls upstream with a security-context
//! token that the gateway signs, so the database is always the authenticated tenant's own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::code::ErrorCode;
use crate::registry::ProjectRecord;
use crate::results::{CacheKey, ResultCache, is_continue_wait};

mod admission;
mod checks;

use crate::settings::CubeSettings;
use crate::signer::Signer;
pub use admission::{Admission, AdmissionTicket};
pub use checks::check_request;

pub const QUERY_DISPATCHER: &str = "query-dispatcher";

/// Pause between asks while Cube answers "Continue wait" and the caller waits server-side.
const CONTINUE_WAIT_PAUSE: Duration = Duration::from_millis(250);

/// Cube has answered and the body is not yet known to be data; bodies of errors are small.
const MAX_ERROR_MESSAGE: usize = 2_000;

/// The Cube REST endpoints a project may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CubeEndpoint {
    Load,
    Meta,
    DryRun,
    Sql,
}

impl CubeEndpoint {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "load" => Some(Self::Load),
            "meta" => Some(Self::Meta),
            "dry-run" => Some(Self::DryRun),
            "sql" => Some(Self::Sql),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Meta => "meta",
            Self::DryRun => "dry-run",
            Self::Sql => "sql",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CubeRequest {
    pub project: ProjectRecord,
    pub endpoint: CubeEndpoint,
    /// POST with `body`, or GET with `query_string`.
    pub post: bool,
    pub query_string: Option<String>,
    pub body: Bytes,
    pub request_id: String,
    /// Ask Cube even when a recent answer is kept (the caller sent `Cache-Control: no-cache`).
    pub bypass_cache: bool,
    /// Ask again while Cube answers "Continue wait", for up to this long (`Prefer: wait=N`).
    pub wait_for_result: Option<Duration>,
}

/// A successful Cube answer, passed on as it came ("Continue wait" included).
#[derive(Debug, Clone)]
pub struct CubeResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    InvalidQuery(String),
    #[error("the project's database does not exist")]
    ProjectMissing,
    #[error("Cube is unavailable: {0}")]
    Upstream(String),
    #[error("Cube did not answer within the deadline")]
    Timeout,
    #[error("too many queries are waiting for Cube; retry shortly")]
    Overloaded,
    #[error("the query dispatcher is unavailable")]
    Unavailable,
}

impl QueryError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidQuery(_) => ErrorCode::InvalidQuery,
            Self::ProjectMissing => ErrorCode::ProjectNotOnboarded,
            Self::Upstream(_) | Self::Unavailable => ErrorCode::UpstreamUnavailable,
            Self::Timeout => ErrorCode::UpstreamTimeout,
            Self::Overloaded => ErrorCode::Overloaded,
        }
    }
}

pub enum QueryMsg {
    Forward(
        Box<CubeRequest>,
        RpcReplyPort<Result<CubeResponse, QueryError>>,
    ),
}

pub struct QueryDispatcher;

pub struct QueryArgs {
    pub cube: CubeSettings,
    pub signer: Arc<Signer>,
}

#[derive(Clone)]
pub struct QueryState {
    http: reqwest::Client,
    base: Arc<str>,
    signer: Arc<Signer>,
    admission: Arc<Admission>,
    results: Option<Arc<ResultCache>>,
}

impl Actor for QueryDispatcher {
    type Msg = QueryMsg;
    type State = QueryState;
    type Arguments = QueryArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<QueryMsg>,
        args: QueryArgs,
    ) -> Result<QueryState, ActorProcessingErr> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(args.cube.timeout_seconds))
            .pool_max_idle_per_host(64)
            .build()?;
        let base = args.cube.url.trim_end_matches('/').into();
        let admission = Arc::new(Admission::new(
            args.cube.max_concurrent_queries,
            args.cube.max_queued_queries,
        ));
        let window = Duration::from_secs(args.cube.result_cache_seconds);
        let results = (!window.is_zero())
            .then(|| Arc::new(ResultCache::new(window, args.cube.result_cache_capacity)));
        Ok(QueryState {
            http,
            base,
            signer: args.signer,
            admission,
            results,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<QueryMsg>,
        message: QueryMsg,
        state: &mut QueryState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            QueryMsg::Forward(request, reply) => {
                let Some(ticket) = state.admission.enter() else {
                    metrics::counter!("monitor_gateway_queries_shed_total").increment(1);
                    let _ = reply.send(Err(QueryError::Overloaded));
                    return Ok(());
                };
                // The upstream call runs on its own task so one slow query never holds the rest.
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = reply.send(state.answer(*request, ticket).await);
                });
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct CubeError {
    error: String,
}

impl QueryState {
    /// Cube's answer; Cube failing is counted.
    async fn answer(
        &self,
        request: CubeRequest,
        ticket: AdmissionTicket,
    ) -> Result<CubeResponse, QueryError> {
        let answer = self.answer_waiting(request, ticket).await;
        if let Err(QueryError::Upstream(_) | QueryError::Timeout) = &answer {
            metrics::counter!("monitor_gateway_upstream_errors_total", "upstream" => "cube")
                .increment(1);
        }
        answer
    }

    /// Cube's answer, asked again while it says "Continue wait" if the caller wants to wait.
    async fn answer_waiting(
        &self,
        request: CubeRequest,
        ticket: AdmissionTicket,
    ) -> Result<CubeResponse, QueryError> {
        let Some(wait) = request.wait_for_result else {
            return self.answer_once(request, &ticket).await;
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let answer = self.answer_once(request.clone(), &ticket).await?;
            if !is_continue_wait(&answer)
                || tokio::time::Instant::now() + CONTINUE_WAIT_PAUSE > deadline
            {
                return Ok(answer);
            }
            tokio::time::sleep(CONTINUE_WAIT_PAUSE).await;
        }
    }

    /// From the result cache when the request may be, else from Cube.
    async fn answer_once(
        &self,
        request: CubeRequest,
        ticket: &AdmissionTicket,
    ) -> Result<CubeResponse, QueryError> {
        let cached = self.results.as_ref().zip(CacheKey::of(&request));
        match cached {
            Some((results, key)) if request.bypass_cache => {
                results
                    .refresh(key, ticket.run(self.forward(request)))
                    .await
            }
            Some((results, key)) => {
                results
                    .get_or_fetch(key, ticket.run(self.forward(request)))
                    .await
            }
            None => ticket.run(self.forward(request)).await,
        }
    }

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

/// How the edge reaches the dispatcher, whichever incarnation of it is running.
#[derive(Clone)]
pub struct Queries {
    timeout: Duration,
}

impl Queries {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    pub async fn forward(&self, request: CubeRequest) -> Result<CubeResponse, QueryError> {
        use ractor::rpc::CallResult;
        let dispatcher: ActorRef<QueryMsg> = ractor::registry::where_is(QUERY_DISPATCHER)
            .ok_or(QueryError::Unavailable)?
            .into();
        match dispatcher
            .call(
                |reply| QueryMsg::Forward(Box::new(request), reply),
                Some(self.timeout),
            )
            .await
        {
            Ok(CallResult::Success(result)) => result,
            Ok(CallResult::Timeout) => Err(QueryError::Timeout),
            Ok(CallResult::SenderError) | Err(_) => Err(QueryError::Unavailable),
        }
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

    #[test]
    fn only_known_endpoints_parse() {
        for name in ["load", "meta", "dry-run", "sql"] {
            assert_eq!(CubeEndpoint::parse(name).unwrap().as_str(), name);
        }
        assert!(CubeEndpoint::parse("../load").is_none());
        assert!(CubeEndpoint::parse("subscribe").is_none());
    }
}
