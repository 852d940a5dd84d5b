//! The HTTP edge: parses requests, hands them to the actors' handles, awaits the answer under a
//! deadline and maps it to HTTP. No domain decisions are taken here.

mod admin;
mod cube;
pub mod error;
mod projects;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::ErrorCode;
use actors::auth::{Authenticator, Credentials, Identity};
use actors::housekeeper::Housekeeping;
use actors::query::Queries;
use actors::signer::Signer;
use actors::tenants::Tenants;
use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

pub use admin::Readiness;
use error::ApiError;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything handlers need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub auth: Arc<Authenticator>,
    pub tenants: Tenants,
    pub queries: Queries,
    pub signer: Arc<Signer>,
    pub public_url: Arc<str>,
    pub max_body_bytes: usize,
    /// The longest a caller may ask to wait out Cube's "Continue wait" (`Prefer: wait=N`).
    pub max_result_wait: Duration,
}

pub fn public_router(state: AppState, request_timeout: Duration) -> Router {
    let max_body_bytes = state.max_body_bytes;
    let router = Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .merge(projects::routes())
        .merge(cube::routes())
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
        .layer(middleware::from_fn_with_state(
            max_body_bytes,
            refuse_oversized_bodies,
        ));
    with_edge_layers(router, request_timeout)
}

/// A body declared larger than the limit is refused on every route, before it is read and
/// before authentication; routes that read a body also stop at the limit when none is declared.
async fn refuse_oversized_bodies(
    State(limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return ApiError::payload_too_large(limit).into_response();
    }
    next.run(request).await
}

pub fn admin_router(
    readiness: Readiness,
    housekeeping: Housekeeping,
    prometheus: PrometheusHandle,
    timeout: Duration,
) -> Router {
    let router = admin::routes(readiness, housekeeping, prometheus)
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() });
    with_edge_layers(router, timeout)
}

/// Request ids (a valid X-Request-Id is kept, anything else replaced), a span per request,
/// metrics, and a deadline answered with a JSON error. Layers added last run first.
fn with_edge_layers(router: Router, timeout: Duration) -> Router {
    router
        .layer(middleware::from_fn_with_state(timeout, deadline))
        .layer(middleware::from_fn(record_metrics))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(middleware::map_request(drop_invalid_request_id))
}

/// Request ids travel to logs and to Cube, so only short plain tokens are taken from callers.
async fn drop_invalid_request_id(mut request: Request) -> Request {
    let valid = |value: &axum::http::HeaderValue| {
        let bytes = value.as_bytes();
        (1..=128).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    let headers = request.headers_mut();
    let values: Vec<_> = headers.get_all(REQUEST_ID).iter().collect();
    if values.len() > 1 || values.first().is_some_and(|value| !valid(value)) {
        headers.remove(REQUEST_ID);
    }
    request
}

async fn deadline(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            ErrorCode::UpstreamTimeout,
            format!("the request did not complete within {}s", timeout.as_secs()),
        )
        .into_response(),
    }
}

fn request_span(request: &Request) -> tracing::Span {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id,
        instance = tracing::field::Empty,
    )
}

/// Counts and times every request by route template and status (never by raw path).
async fn record_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());

    let response = next.run(request).await;
    if response.status().is_server_error() {
        tracing::warn!(%route, status = response.status().as_u16(), "request failed");
    }
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("monitor_gateway_http_requests_total", &labels).increment(1);
    metrics::histogram!("monitor_gateway_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn jwks(State(state): State<AppState>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        state.signer.jwks(),
    )
        .into_response()
}

/// The request id of the current request, for upstream calls.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// An authenticated GitLab instance; extracting it runs the full Cloud Connector check.
pub struct Authenticated(pub Identity);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let headers = &parts.headers;
        let credentials = Credentials {
            authorization: credential(headers, "authorization", ErrorCode::MalformedToken)?,
            instance_id: credential(headers, "x-gitlab-instance-id", ErrorCode::InstanceMismatch)?,
            realm: credential(headers, "x-gitlab-realm", ErrorCode::RealmMismatch)?,
            authentication_type: credential(
                headers,
                "x-gitlab-authentication-type",
                ErrorCode::UnsupportedAuthenticationType,
            )?,
        };
        let identity = state
            .auth
            .authenticate(&credentials)
            .await
            .inspect_err(|err| {
                tracing::info!(code = err.code.as_str(), "authentication refused");
            })?;
        tracing::Span::current().record("instance", identity.instance.as_str());
        Ok(Self(identity))
    }
}

/// One credential header: absent, or present once as visible ASCII. A header sent twice or with
/// other bytes is refused rather than read as absent or as its first value.
fn credential<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
    code: ErrorCode,
) -> Result<Option<&'a str>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::new(
            code,
            format!("the {name} header is sent more than once"),
        ));
    }
    let text = value
        .to_str()
        .map_err(|_| ApiError::new(code, format!("the {name} header is not plain ASCII")))?;
    Ok(Some(text))
}
