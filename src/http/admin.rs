//! The admin listener: liveness, readiness with reasons, Prometheus metrics, and the
//! operator's reconcile and purge triggers.

use std::sync::Arc;
use std::time::Duration;

use actors::auth::Authenticator;
use actors::housekeeper::{Housekeeping, Reconciled};
use actors::registry::Registry;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

/// Longest a readiness probe waits for ClickHouse or Cube, well inside the probe's own deadline.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What readiness looks at: issuers' keys, ClickHouse (with the registry table), Cube, and
/// the start-up reconciliation having run.
#[derive(Clone)]
pub struct Readiness {
    pub auth: Arc<Authenticator>,
    pub registry: Arc<Registry>,
    pub reconciled: Reconciled,
    pub cube_url: Arc<str>,
    pub http: reqwest::Client,
}

impl Readiness {
    pub fn new(
        auth: Arc<Authenticator>,
        registry: Arc<Registry>,
        reconciled: Reconciled,
        cube_url: &str,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(CHECK_TIMEOUT)
            .build()
            .expect("a plain HTTP client always builds");
        Self {
            auth,
            registry,
            reconciled,
            cube_url: cube_url.trim_end_matches('/').into(),
            http,
        }
    }

    async fn problems(&self) -> Vec<String> {
        let (clickhouse, cube) = tokio::join!(self.clickhouse_problem(), self.cube_problem());
        let keys = (!self.auth.has_keys())
            .then(|| "no issuer has published usable signing keys yet".to_owned());
        // Until it has run, a project whose registry row a crash took answers 404.
        let reconciled = (!self.reconciled.get())
            .then(|| "the start-up reconciliation has not finished yet".to_owned());
        [keys, clickhouse, cube, reconciled]
            .into_iter()
            .flatten()
            .collect()
    }

    async fn clickhouse_problem(&self) -> Option<String> {
        match tokio::time::timeout(CHECK_TIMEOUT, self.registry.schema_exists()).await {
            Ok(Ok(true)) => None,
            Ok(Ok(false)) => Some("ClickHouse: the registry table does not exist yet".to_owned()),
            Ok(Err(err)) => Some(format!("ClickHouse: {err}")),
            Err(_) => Some(format!("ClickHouse: no answer within {CHECK_TIMEOUT:?}")),
        }
    }

    async fn cube_problem(&self) -> Option<String> {
        match self
            .http
            .get(format!("{}/readyz", self.cube_url))
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("Cube: /readyz answered {}", response.status())),
            Err(err) => Some(format!("Cube: {}", err.without_url())),
        }
    }
}

pub fn routes(
    readiness: Readiness,
    housekeeping: Housekeeping,
    prometheus: PrometheusHandle,
) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(ready).with_state(readiness))
        .route(
            "/metrics",
            get(move || std::future::ready(prometheus.render())),
        )
        .route(
            "/reconcile",
            post(reconcile).with_state(housekeeping.clone()),
        )
        .route("/purge", post(purge).with_state(housekeeping))
}

/// Finishes half-done onboardings and lists tenant databases the registry does not know.
async fn reconcile(State(housekeeping): State<Housekeeping>) -> Response {
    report(housekeeping.reconcile().await)
}

/// Drops the databases of projects deprovisioned longer ago than the grace period.
async fn purge(State(housekeeping): State<Housekeeping>) -> Response {
    report(housekeeping.purge().await)
}

fn report<T: serde::Serialize>(outcome: Result<T, String>) -> Response {
    match outcome {
        Ok(report) => Json(report).into_response(),
        Err(message) => {
            let body = json!({ "error": { "code": "upstream_unavailable", "message": message } });
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

async fn ready(State(readiness): State<Readiness>) -> Response {
    let problems = readiness.problems().await;
    let keys: serde_json::Map<String, serde_json::Value> = readiness
        .auth
        .key_counts()
        .into_iter()
        .map(|(name, count)| (name, count.into()))
        .collect();
    if problems.is_empty() {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "issuer_keys": keys })),
        )
            .into_response()
    } else {
        let body = json!({ "status": "not_ready", "reasons": problems, "issuer_keys": keys });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}
