//! The admin listener: liveness, readiness with reasons, Prometheus metrics, and the
//! operator's reconcile and purge triggers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actors::auth::Authenticator;
use actors::housekeeper::Housekeeping;
use actors::registry::Registry;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

/// What readiness looks at: issuers' keys, ClickHouse (with the registry schema) and Cube.
#[derive(Clone)]
pub struct Readiness {
    pub auth: Arc<Authenticator>,
    pub registry: Arc<Registry>,
    pub schema_ready: Arc<AtomicBool>,
    pub cube_url: Arc<str>,
    pub http: reqwest::Client,
}

impl Readiness {
    pub fn new(
        auth: Arc<Authenticator>,
        registry: Arc<Registry>,
        schema_ready: Arc<AtomicBool>,
        cube_url: &str,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("a plain HTTP client always builds");
        Self {
            auth,
            registry,
            schema_ready,
            cube_url: cube_url.trim_end_matches('/').into(),
            http,
        }
    }

    async fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.auth.has_keys() {
            problems.push("no issuer has published usable signing keys yet".to_owned());
        }
        if let Err(err) = self.registry.ping().await {
            problems.push(format!("ClickHouse: {err}"));
        } else if !self.schema_ready.load(Ordering::Relaxed) {
            problems.push("ClickHouse: the registry schema is not created yet".to_owned());
        }
        let cube = self
            .http
            .get(format!("{}/readyz", self.cube_url))
            .send()
            .await;
        match cube {
            Ok(response) if response.status().is_success() => {}
            Ok(response) => problems.push(format!("Cube: /readyz answered {}", response.status())),
            Err(err) => problems.push(format!("Cube: {}", err.without_url())),
        }
        problems
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
