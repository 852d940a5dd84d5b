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
use crate::settings::CubeSettings;
use crate::signer::Signer;

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

/// Bounds the work handed to Cube: `running` requests at once, and room for `queued` more to
/// wait; anything beyond is refused at once instead of piling up in memory.
pub struct Admission {
    running: tokio::sync::Semaphore,
    admitted: std::sync::atomic::AtomicUsize,
    capacity: usize,
}

impl Admission {
    pub fn new(running: usize, queued: usize) -> Self {
        let running = running.max(1);
        Self {
            running: tokio::sync::Semaphore::new(running),
            admitted: std::sync::atomic::AtomicUsize::new(0),
            capacity: running + queued,
        }
    }

    /// A place among the admitted requests, or None when running and queue are full.
    pub fn enter(self: &Arc<Self>) -> Option<AdmissionTicket> {
        use std::sync::atomic::Ordering;
        let entered = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok();
        entered.then(|| AdmissionTicket {
            admission: self.clone(),
        })
    }
}

/// Held while a request is queued or running; leaving frees its place.
pub struct AdmissionTicket {
    admission: Arc<Admission>,
}

impl AdmissionTicket {
    /// Waits for a running slot.
    pub async fn run<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let _slot = self
            .admission
            .running
            .acquire()
            .await
            .expect("the semaphore is never closed");
        work.await
    }
}

impl Drop for AdmissionTicket {
    fn drop(&mut self) {
        self.admission
            .admitted
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
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

/// Checks what a `load`, `sql` or `dry-run` request asks before it goes to Cube. Cube 0.33
/// pastes a query's `timezone` into SQL unescaped, so only plain zone names may pass; the Cube
/// configuration checks the same again. For GET, it returns the query string to forward, built
/// from the checked values alone, so Cube never parses anything the gateway did not check.
pub fn check_request(
    endpoint: CubeEndpoint,
    post: bool,
    body: &[u8],
    query_string: Option<&str>,
) -> Result<Option<String>, QueryError> {
    let invalid = |what: &str| QueryError::InvalidQuery(what.to_owned());
    if endpoint == CubeEndpoint::Meta {
        return Ok(None);
    }
    if post {
        let body: serde_json::Value =
            serde_json::from_slice(body).map_err(|_| invalid("the request body is not JSON"))?;
        let query = body
            .get("query")
            .cloned()
            .ok_or_else(|| invalid("a query is required"))?;
        check_timezones(&parse_query(query)?)?;
        return Ok(None);
    }

    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query_string.unwrap_or(""))
        .map_err(|_| invalid("the query string is malformed"))?;
    let (mut query, mut query_type) = (None, None);
    for (name, value) in pairs {
        let slot = match name.as_str() {
            "query" => &mut query,
            "queryType" => &mut query_type,
            _ => {
                return Err(invalid(
                    "only the query and queryType parameters are accepted",
                ));
            }
        };
        if slot.replace(value).is_some() {
            return Err(invalid("each parameter may be given once"));
        }
    }
    let query = parse_query(serde_json::Value::String(
        query.ok_or_else(|| invalid("a query is required"))?,
    ))?;
    check_timezones(&query)?;
    if query_type.as_deref().is_some_and(|kind| kind != "multi") {
        return Err(invalid("queryType may only be multi"));
    }

    let mut forwarded = vec![("query", query.to_string())];
    forwarded.extend(query_type.map(|kind| ("queryType", kind)));
    let encoded =
        serde_urlencoded::to_string(forwarded).map_err(|_| invalid("unencodable query"))?;
    Ok(Some(encoded))
}

/// Cube accepts the query as JSON or as a string holding JSON.
fn parse_query(query: serde_json::Value) -> Result<serde_json::Value, QueryError> {
    match query {
        serde_json::Value::String(text) => serde_json::from_str(&text)
            .map_err(|_| QueryError::InvalidQuery("the query is not valid JSON".to_owned())),
        other => Ok(other),
    }
}

fn check_timezones(query: &serde_json::Value) -> Result<(), QueryError> {
    match query {
        serde_json::Value::Array(queries) => queries.iter().try_for_each(check_timezones),
        serde_json::Value::Object(fields) => match fields.get("timezone") {
            None => Ok(()),
            Some(serde_json::Value::String(zone)) if is_zone_name(zone) => Ok(()),
            Some(_) => Err(QueryError::InvalidQuery(
                "timezone must be an IANA time zone name such as \"UTC\" or \"Europe/Berlin\""
                    .to_owned(),
            )),
        },
        _ => Err(QueryError::InvalidQuery(
            "the query must be a JSON object".to_owned(),
        )),
    }
}

/// `Area/Location` shapes: letters first, then letters, digits, `_`, `+`, `-` and `/`.
fn is_zone_name(zone: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '/');
    (1..=64).contains(&zone.len())
        && zone.starts_with(|c: char| c.is_ascii_alphabetic())
        && zone.chars().all(allowed)
        && !zone.contains("//")
        && !zone.ends_with('/')
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
    fn only_plain_time_zone_names_reach_cube() {
        let post = |query: serde_json::Value| {
            let body = serde_json::json!({ "query": query }).to_string();
            check_request(CubeEndpoint::Load, true, body.as_bytes(), None)
        };
        for zone in [
            "UTC",
            "Europe/Berlin",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+5",
        ] {
            assert!(
                post(serde_json::json!({ "timezone": zone })).is_ok(),
                "{zone}"
            );
        }
        for zone in [
            "UTC'), evil",
            "UTC' --",
            "",
            "/etc",
            "a//b",
            "Europe/",
            "1UTC",
            "Europe/Berlin\n",
        ] {
            assert!(
                post(serde_json::json!({ "timezone": zone })).is_err(),
                "{zone:?}"
            );
        }
        assert!(post(serde_json::json!({ "timezone": 5 })).is_err());
        assert!(post(serde_json::json!([{ "timezone": "UTC" }, { "timezone": "x'y" }])).is_err());
        assert!(post(serde_json::json!("{\"timezone\": \"x'y\"}")).is_err());

        let get = |query: &str| check_request(CubeEndpoint::Load, false, b"", Some(query));
        assert!(get("query=%7B%22timezone%22%3A%22UTC%22%7D").is_ok());
        assert!(get("query=%7B%22timezone%22%3A%22UTC%27%22%7D").is_err());
        assert!(get("queryType=multi").is_err());
        assert!(get("query=%7B%7D&query=%7B%7D").is_err(), "duplicate query");
        assert!(
            get("query[timezone]=x&query=%7B%7D").is_err(),
            "bracket parameters"
        );
        assert!(get("query=%7B%7D&j0=1").is_err(), "unknown parameters");
        assert_eq!(
            get("query=%7B%22timezone%22%3A%22UTC%22%7D&queryType=multi")
                .unwrap()
                .as_deref(),
            Some("query=%7B%22timezone%22%3A%22UTC%22%7D&queryType=multi")
        );
        assert!(check_request(CubeEndpoint::Load, true, b"not json", None).is_err());
        assert!(check_request(CubeEndpoint::Meta, false, b"", None).is_ok());
    }

    #[tokio::test]
    async fn admission_sheds_beyond_running_and_queued() {
        let admission = Arc::new(Admission::new(1, 1));
        let first = admission.enter().expect("a running place");
        let second = admission.enter().expect("a queued place");
        assert!(admission.enter().is_none(), "full");
        drop(first);
        let third = admission.enter().expect("a place freed");
        assert_eq!(third.run(async { 7 }).await, 7);
        drop((second, third));
        assert!(admission.enter().is_some());
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
