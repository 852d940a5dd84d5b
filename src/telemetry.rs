//! Logs (tracing, JSON or text) and the Prometheus recorder with explicit histogram buckets.

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Request latency buckets in seconds: from sub-millisecond cache hits to slow Cube queries.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Registry rows per INSERT.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0,
];

pub fn init_logs(settings: &LogSettings) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&settings.level).context("log.level")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let result = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|err| anyhow::anyhow!("cannot install the log subscriber: {err}"))
}

pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".to_owned()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("monitor_gateway_registry_batch_rows".to_owned()),
            BATCH_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    register_at_zero();
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "monitor_gateway_http_requests_total",
        "HTTP requests by method, route and status"
    );
    describe_histogram!(
        "monitor_gateway_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by method, route and status"
    );
    describe_counter!(
        "monitor_gateway_auth_total",
        "Authentication outcomes by reason and realm"
    );
    describe_counter!(
        "monitor_gateway_auth_token_cache_total",
        "Verified-token cache lookups by result"
    );
    describe_counter!(
        "monitor_gateway_jwks_refresh_total",
        "Key-set fetches by issuer, trigger and outcome"
    );
    describe_counter!(
        "monitor_gateway_jwks_refresh_suppressed_total",
        "Unknown-kid refreshes skipped because the issuer was fetched moments ago"
    );
    describe_gauge!(
        "monitor_gateway_jwks_keys",
        "Usable keys in each issuer's current key set"
    );
    describe_gauge!(
        "monitor_gateway_jwks_last_success_timestamp_seconds",
        Unit::Seconds,
        "When each issuer's key set was last fetched successfully"
    );
    describe_counter!(
        "monitor_gateway_projects_onboarded_total",
        "Projects moved to ready"
    );
    describe_counter!(
        "monitor_gateway_projects_deprovisioned_total",
        "Projects deprovisioned"
    );
    describe_counter!(
        "monitor_gateway_projects_purged_total",
        "Project databases dropped after their grace period"
    );
    describe_counter!(
        "monitor_gateway_quota_refusals_total",
        "Onboardings refused by the project quota"
    );
    describe_counter!(
        "monitor_gateway_upstream_errors_total",
        "Failed requests to ClickHouse or Cube by upstream"
    );
    describe_gauge!(
        "monitor_gateway_unregistered_databases",
        "Tenant databases without a registry entry at the last reconciliation"
    );
    describe_gauge!("monitor_gateway_tenant_actors", "Running tenant actors");
    describe_counter!(
        "monitor_gateway_queries_shed_total",
        "Cube requests the dispatcher refused, by reason (queue_full, expired, shutdown)"
    );
    describe_counter!(
        "monitor_gateway_queries_refused_total",
        "Queries refused for their instance, by reason (rate: its token bucket; concurrency: its \
         queries in flight)"
    );
    describe_counter!(
        "monitor_gateway_queries_abandoned_total",
        "Queued Cube requests dropped because their caller had gone"
    );
    describe_counter!(
        "monitor_gateway_query_worker_starts_total",
        "Query workers started: the pool at start, then replacements of stuck or failed ones"
    );
    describe_histogram!(
        "monitor_gateway_registry_batch_rows",
        "Registry rows per INSERT"
    );
    describe_counter!(
        "monitor_gateway_registry_write_failures_total",
        "Registry INSERTs that failed or timed out (their rows are written again)"
    );
    describe_counter!(
        "monitor_gateway_actor_failures_total",
        "Supervised actor failures by actor"
    );
}

/// Series that only move on trouble exist from the start, so dashboards and alerts see 0
/// rather than no data.
fn register_at_zero() {
    for counter in [
        "monitor_gateway_queries_abandoned_total",
        "monitor_gateway_quota_refusals_total",
        "monitor_gateway_projects_onboarded_total",
        "monitor_gateway_projects_deprovisioned_total",
        "monitor_gateway_projects_purged_total",
        "monitor_gateway_registry_write_failures_total",
    ] {
        metrics::counter!(counter).absolute(0);
    }
    for reason in ["queue_full", "expired", "shutdown"] {
        metrics::counter!("monitor_gateway_queries_shed_total", "reason" => reason).absolute(0);
    }
    for reason in ["rate", "concurrency"] {
        metrics::counter!("monitor_gateway_queries_refused_total", "reason" => reason).absolute(0);
    }
    for upstream in ["clickhouse", "cube"] {
        metrics::counter!("monitor_gateway_upstream_errors_total", "upstream" => upstream)
            .absolute(0);
    }
    for actor in [
        "tenant",
        "issuer",
        "keys",
        "tenants",
        "query-dispatcher",
        "housekeeper",
    ] {
        metrics::counter!("monitor_gateway_actor_failures_total", "actor" => actor).absolute(0);
    }
    metrics::gauge!("monitor_gateway_tenant_actors").set(0.0);
    metrics::gauge!("monitor_gateway_unregistered_databases").set(0.0);
}
