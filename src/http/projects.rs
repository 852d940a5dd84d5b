//! Project onboarding and connection details.

use actors::ErrorCode;
use actors::registry::ProjectRecord;
use actors::tenancy::ProjectId;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::error::ApiError;
use super::{AppState, Authenticated};

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/v1/product-analytics/projects/{project_id}",
        put(onboard).get(details),
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
        let created_at = OffsetDateTime::from_unix_timestamp(i64::from(record.created_at))
            .ok()
            .and_then(|at| at.format(&Rfc3339).ok())
            .unwrap_or_default();
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
            created_at,
        }
    }
}

pub fn parse_project(text: &str) -> Result<ProjectId, ApiError> {
    ProjectId::parse(text)
        .map_err(|err| ApiError::new(ErrorCode::InvalidProjectId, err.to_string()))
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
    Ok((
        status,
        Json(ConnectionDetails::new(
            &onboarded.project,
            &state.public_url,
        )),
    )
        .into_response())
}

async fn details(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    Path(project_id): Path<String>,
) -> Result<Json<ConnectionDetails>, ApiError> {
    let project = parse_project(&project_id)?;
    let record = state
        .tenants
        .ready_project(&identity.instance, project)
        .await?;
    Ok(Json(ConnectionDetails::new(&record, &state.public_url)))
}
