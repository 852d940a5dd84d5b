//! The HTTP edge: parses requests, hands them to the actors' handles, awaits the answer under a
//! deadline and maps it to HTTP. No domain decisions are taken here.

mod admin;
mod cube;
pub mod error;
mod projects;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::auth::{Authenticator, Credentials, Identity};
use actors::housekeeper::Housekeeping;
use actors::query::Queries;
use actors::signer::Signer;
use actors::tenants::Tenants;
use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
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
}

pub fn public_router(state: AppState, request_timeout: Duration) -> Router {
    let router = Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .merge(projects::routes())
        .merge(cube::routes())
        .fallback(|| async { ApiError::not_found() })
        .with_state(state)
        .layer(middleware::from_fn(record_metrics));
    with_edge_layers(router, request_timeout)
}

pub fn admin_router(
    readiness: Readiness,
    housekeeping: Housekeeping,
    prometheus: PrometheusHandle,
    timeout: Duration,
) -> Router {
    with_edge_layers(admin::routes(readiness, housekeeping, prometheus), timeout)
}

/// Request ids (taken from X-Request-Id or generated), a span per request, and a deadline.
/// Layers added last run first.
fn with_edge_layers(router: Router, timeout: Duration) -> Router {
    router
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            timeout,
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
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
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|value| value.to_str().ok())
        };
        let credentials = Credentials {
            authorization: header("authorization"),
            instance_id: header("x-gitlab-instance-id"),
            realm: header("x-gitlab-realm"),
            authentication_type: header("x-gitlab-authentication-type"),
        };
        if parts.headers.get(header::AUTHORIZATION).is_some() && credentials.authorization.is_none()
        {
            return Err(ApiError::new(
                actors::ErrorCode::MalformedToken,
                "the Authorization header is not ASCII",
            ));
        }
        let identity = state.auth.authenticate(&credentials).await?;
        tracing::Span::current().record("instance", identity.instance.as_str());
        Ok(Self(identity))
    }
}
