//! The project lifecycle: onboarding, connection details, listing, deprovisioning and usage.

use actors::ErrorCode;
use actors::registry::ProjectRecord;
use actors::tenancy::ProjectId;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
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

/// A trailing slash with no id is a malformed project id, not an unknown route.
async fn empty_project_id(Authenticated(_): Authenticated) -> ApiError {
    ApiError::new(ErrorCode::InvalidProjectId, "the project id is empty")
}

async fn onboard(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    Path(project_id): Path<String>,
) -> Result<Response, ApiError> {
    let project = parse_project(&project_id)?;
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
    Path(project_id): Path<String>,
) -> Result<Json<ConnectionDetails>, ApiError> {
    let project = parse_project(&project_id)?;
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
    Path(project_id): Path<String>,
) -> Result<Json<ConnectionDetails>, ApiError> {
    let project = parse_project(&project_id)?;
    let record = state
        .tenants
        .deprovision(&identity.instance, project)
        .await?;
    Ok(Json(ConnectionDetails::new(&record, &state.public_url)))
}

#[derive(Deserialize)]
struct UsageQuery {
    year: Option<String>,
    month: Option<String>,
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
    Path(project_id): Path<String>,
    Query(query): Query<UsageQuery>,
) -> Result<Json<Usage>, ApiError> {
    let project = parse_project(&project_id)?;
    let invalid = || {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "usage needs year (1970-2105) and month (1-12) as query parameters",
        )
    };
    let year: u16 = query
        .year
        .as_deref()
        .and_then(|y| y.parse().ok())
        .ok_or_else(invalid)?;
    let month: u8 = query
        .month
        .as_deref()
        .and_then(|m| m.parse().ok())
        .ok_or_else(invalid)?;
    if !(1970..=2105).contains(&year) || !(1..=12).contains(&month) {
        return Err(invalid());
    }
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
