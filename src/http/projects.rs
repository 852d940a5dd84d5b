//! The project lifecycle: onboarding, connection details, listing, deprovisioning and usage.

use actors::ErrorCode;
use actors::registry::ProjectRecord;
use actors::tenancy::ProjectId;
use axum::extract::{FromRequestParts, RawPathParams, RawQuery, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::error::ApiError;
use super::{AppState, Authenticated};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/product-analytics/projects", get(list))
        .route(
            "/v1/product-analytics/projects/",
            put(empty_project_id)
                .get(empty_project_id)
                .delete(empty_project_id),
        )
        .route(
            "/v1/product-analytics/projects/{project_id}",
            put(onboard).get(details).delete(deprovision),
        )
        .route(
            "/v1/product-analytics/projects/{project_id}/usage",
            get(usage),
        )
}

/// What an instance stores to use a project: field names are part of the API contract.
#[derive(Debug, Serialize)]
pub struct ConnectionDetails {
    project_id: u64,
    instance_id: String,
    tenant_key: String,
    database: String,
    app_id: String,
    collector_url: String,
    query_url: String,
    status: &'static str,
    created_at: String,
}

impl ConnectionDetails {
    fn new(record: &ProjectRecord, public_url: &str) -> Self {
        let base = public_url.trim_end_matches('/');
        Self {
            project_id: record.project.get(),
            instance_id: record.instance.to_string(),
            tenant_key: record.tenant_key.to_string(),
            database: record.tenant_key.database(),
            app_id: record.tenant_key.to_string(),
            collector_url: format!("{base}/collector"),
            query_url: format!(
                "{base}/v1/product-analytics/projects/{}/cubejs-api/v1",
                record.project
            ),
            status: record.status.as_str(),
            created_at: rfc3339(record.created_at),
        }
    }
}

fn rfc3339(unix_seconds: u32) -> String {
    OffsetDateTime::from_unix_timestamp(i64::from(unix_seconds))
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_default()
}

pub fn parse_project(text: &str) -> Result<ProjectId, ApiError> {
    ProjectId::parse(text)
        .map_err(|err| ApiError::new(ErrorCode::InvalidProjectId, err.to_string()))
}

/// The path's parameters as matched (no copies), with a JSON error rather than axum's plain
/// text when they are not UTF-8.
pub struct PathParams(RawPathParams);

impl PathParams {
    pub async fn from_parts(parts: &mut Parts) -> Result<Self, ApiError> {
        RawPathParams::from_request_parts(parts, &())
            .await
            .map(Self)
            .map_err(|_| ApiError::new(ErrorCode::InvalidProjectId, "the path is not valid UTF-8"))
    }

    /// The value of a parameter, empty when the route has none of that name.
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(key, _)| *key == name)
            .map_or("", |(_, value)| value)
    }
}

/// The `{project_id}` of the path, checked.
pub struct ProjectParam(pub ProjectId);

impl<S: Send + Sync> FromRequestParts<S> for ProjectParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let params = PathParams::from_parts(parts).await?;
        parse_project(params.get("project_id")).map(Self)
    }
}

/// A trailing slash with no id is a malformed project id, not an unknown route.
async fn empty_project_id(Authenticated(_): Authenticated) -> ApiError {
    ApiError::new(ErrorCode::InvalidProjectId, "the project id is empty")
}

async fn onboard(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    ProjectParam(project): ProjectParam,
) -> Result<Response, ApiError> {
    let onboarded = state.tenants.onboard(&identity.instance, project).await?;
    let status = if onboarded.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let details = ConnectionDetails::new(&onboarded.project, &state.public_url);
    Ok((status, Json(details)).into_response())
}

async fn details(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    ProjectParam(project): ProjectParam,
) -> Result<Json<ConnectionDetails>, ApiError> {
    let record = state.tenants.project(&identity.instance, project).await?;
    Ok(Json(ConnectionDetails::new(&record, &state.public_url)))
}

#[derive(Serialize)]
struct ProjectList {
    projects: Vec<ConnectionDetails>,
}

async fn list(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
) -> Result<Json<ProjectList>, ApiError> {
    let records = state.tenants.projects(&identity.instance).await?;
    let projects = records
        .iter()
        .map(|record| ConnectionDetails::new(record, &state.public_url))
        .collect();
    Ok(Json(ProjectList { projects }))
}

async fn deprovision(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    ProjectParam(project): ProjectParam,
) -> Result<Json<ConnectionDetails>, ApiError> {
    let record = state
        .tenants
        .deprovision(&identity.instance, project)
        .await?;
    Ok(Json(ConnectionDetails::new(&record, &state.public_url)))
}

#[derive(Serialize)]
struct Usage {
    project_id: u64,
    year: u16,
    month: u8,
    events: u64,
}

async fn usage(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    ProjectParam(project): ProjectParam,
    RawQuery(query): RawQuery,
) -> Result<Json<Usage>, ApiError> {
    let (year, month) = usage_period(query.as_deref())?;
    let events = state
        .tenants
        .usage(&identity.instance, project, year, month)
        .await?;
    Ok(Json(Usage {
        project_id: project.get(),
        year,
        month,
        events,
    }))
}

/// `year` (1970-2105) and `month` (1-12), each exactly once.
fn usage_period(query: Option<&str>) -> Result<(u16, u8), ApiError> {
    let invalid = || {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "usage needs year (1970-2105) and month (1-12), once each, as query parameters",
        )
    };
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or_default()).map_err(|_| invalid())?;
    let single = |name: &str| {
        let mut values = pairs
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value);
        match (values.next(), values.next()) {
            (Some(value), None) => Ok(value.as_str()),
            _ => Err(invalid()),
        }
    };
    let year: u16 = single("year")?.parse().map_err(|_| invalid())?;
    let month: u8 = single("month")?.parse().map_err(|_| invalid())?;
    if !(1970..=2105).contains(&year) || !(1..=12).contains(&month) {
        return Err(invalid());
    }
    Ok((year, month))
}
