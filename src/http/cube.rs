//! Cube's REST API for one project: the caller's identity picks the project, the project picks
//! the database, and the request itself can choose neither.

use actors::query::{CubeEndpoint, CubeRequest, check_request};
use actors::tenancy::ProjectId;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::error::ApiError;
use super::projects::{PathParams, parse_project};
use super::{AppState, Authenticated, request_id};

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/v1/product-analytics/projects/{project_id}/cubejs-api/v1/{endpoint}",
        get(forward).post(forward),
    )
}

/// The path's project and Cube endpoint (one of Cube's REST endpoints, else 404).
struct CubeTarget(ProjectId, CubeEndpoint);

impl<S: Send + Sync> FromRequestParts<S> for CubeTarget {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let params = PathParams::from_parts(parts).await?;
        let project = parse_project(params.get("project_id"))?;
        let endpoint =
            CubeEndpoint::parse(params.get("endpoint")).ok_or_else(ApiError::not_found)?;
        Ok(Self(project, endpoint))
    }
}

async fn forward(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    CubeTarget(project, endpoint): CubeTarget,
    method: Method,
    RawQuery(query_string): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let post = method == Method::POST;
    // A declared length beyond the limit never got here; an undeclared one stops at it.
    let body = if post {
        axum::body::to_bytes(body, state.max_body_bytes)
            .await
            .map_err(|_| ApiError::payload_too_large(state.max_body_bytes))?
    } else {
        bytes::Bytes::new()
    };
    let query_string = check_request(endpoint, post, &body, query_string.as_deref())?;

    let (project, share) = state
        .tenants
        .admit_query(&identity.instance, project)
        .await?;
    let answer = state
        .queries
        .forward(CubeRequest {
            project,
            share,
            endpoint,
            post,
            query_string,
            body,
            request_id: request_id(&headers),
            bypass_cache: asks_fresh(&headers),
            wait_for_result: wait_preference(&headers, state.max_result_wait),
        })
        .await?;

    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let content_type = answer
        .content_type
        .and_then(|value| HeaderValue::from_str(&value).ok())
        .unwrap_or(HeaderValue::from_static("application/json"));
    Ok((status, [(header::CONTENT_TYPE, content_type)], answer.body).into_response())
}

/// `Cache-Control: no-cache` (or `no-store`) asks for an answer straight from Cube.
fn asks_fresh(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|directive| matches!(directive.trim(), "no-cache" | "no-store"))
}

/// `Prefer: wait=N` (RFC 7240): wait up to N seconds, within the gateway's limit, for a result
/// instead of passing "Continue wait" on.
fn wait_preference(headers: &HeaderMap, limit: std::time::Duration) -> Option<std::time::Duration> {
    let seconds = headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|preference| {
            preference
                .trim()
                .strip_prefix("wait=")?
                .trim()
                .parse::<u64>()
                .ok()
        })?;
    Some(std::time::Duration::from_secs(seconds).min(limit))
}
