//! Crashes and outages in the middle of a change: a gateway killed, ClickHouse lost or frozen,
//! registry writes that failed or timed out. Whatever was answered is what the registry ends with.

use std::time::Duration;

use futures::future::join_all;
use reqwest::Method;

use super::{database_exists, project_path, reconcile};
use crate::common::{
    self, Gateway, Issuer, new_instance, registry_settles, registry_status, tenant_key,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_onboarding_leaves_nothing_the_next_attempt_cannot_finish() {
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let projects: Vec<u64> = (100..130).collect();

    let gateway = Gateway::start(&[&issuer]).await;
    let pid = gateway.pid();
    let calls = projects.iter().map(|project| {
        try_send(
            &gateway,
            Method::PUT,
            project_path(*project),
            &token,
            &instance,
        )
    });
    let onboarding = join_all(calls);
    let killer = async {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        assert!(killed.unwrap().success());
    };
    // Some calls complete, the rest die with the connection; both are fine here.
    let _ = tokio::join!(onboarding_quietly(onboarding), killer);

    drop(gateway);
    let gateway = Gateway::start(&[&issuer]).await;
    let report = reconcile(&gateway).await;
    let ours: Vec<String> = projects.iter().map(|p| tenant_key(&instance, *p)).collect();
    assert!(
        report["failed"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| !ours.contains(&k.as_str().unwrap().to_owned())),
        "{report}"
    );

    for project in &projects {
        let (status, body) = gateway
            .call(Method::PUT, project_path(*project), &token, &instance)
            .await;
        assert!(matches!(status, 200 | 201), "{project}: {status} {body}");
        assert_eq!(body["status"], "ready");
        assert!(database_exists(body["database"].as_str().unwrap()).await);
    }
    let report = reconcile(&gateway).await;
    let leftovers = |field: &str| {
        report[field]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| {
                let k = k.as_str().unwrap();
                ours.iter().any(|key| k.ends_with(key.as_str()))
            })
            .count()
    };
    assert_eq!(
        (
            leftovers("completed"),
            leftovers("failed"),
            leftovers("unregistered_databases")
        ),
        (0, 0, 0),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_right_after_answering_finishes_the_onboarding_when_it_starts_again() {
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 140);

    let mut gateway = Gateway::start(&[&issuer]).await;
    let (status, answered) = gateway.onboard(&token, &instance, 140).await;
    assert_eq!((status, answered["status"].as_str()), (201, Some("ready")));
    gateway.kill();
    // The answer came before its registry row, which a lone onboarding keeps queued a while.
    assert_eq!(registry_status(&key).await, "");

    // No second PUT: the restarted gateway adopts the database marked as the project's, as it
    // was answered, and counts it.
    let gateway = Gateway::start(&[&issuer]).await;
    registry_settles(&key, "ready").await;
    let metrics = gateway.metrics().await;
    let onboarded = common::metric(&metrics, "monitor_gateway_projects_onboarded_total", &[]);
    // At least ours: its start-up reconciliation may finish other tests' leftovers too.
    assert!(onboarded >= 1.0, "{metrics}");
    let (status, shown) = gateway
        .call(Method::GET, project_path(140), &token, &instance)
        .await;
    assert_eq!((status, &shown), (200, &answered));
}

/// Like `send`, for calls that may die with the gateway.
async fn try_send(
    gateway: &Gateway,
    method: Method,
    path: impl AsRef<str>,
    token: &str,
    instance: &str,
) -> Option<u16> {
    let request = gateway.api(method, path.as_ref(), token, instance);
    request
        .send()
        .await
        .ok()
        .map(|response| response.status().as_u16())
}

async fn onboarding_quietly<F: std::future::Future>(future: F) {
    let _ = tokio::time::timeout(Duration::from_secs(30), future).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_row_lost_with_clickhouse_after_the_answer_is_written_once_it_is_back() {
    let mut clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = clickhouse
        .gateway(&issuer)
        .env("CLICKHOUSE__TIMEOUT_SECONDS", 1);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let failures = |metrics: &str| {
        common::metric(
            metrics,
            "monitor_gateway_registry_write_failures_total",
            &[],
        )
    };
    let failed_before = failures(&gateway.metrics().await);

    // A lone onboarding's `ready` row waits a moment for company; ClickHouse dies meanwhile.
    let (status, answered) = gateway.onboard(&token, &instance, 1).await;
    assert_eq!((status, answered["status"].as_str()), (201, Some("ready")));
    clickhouse.kill();
    let failed = || async { failures(&gateway.metrics().await) > failed_before };
    common::eventually(
        Duration::from_secs(5),
        "the ready row's INSERT failed",
        failed,
    )
    .await;

    // The answer stands while the registry is away; once it is back the row is written.
    let (status, shown) = gateway
        .call(Method::GET, project_path(1), &token, &instance)
        .await;
    assert_eq!((status, &shown), (200, &answered));
    clickhouse.resume().await;
    let key = answered["tenant_key"].as_str().unwrap();
    let written = || async { clickhouse.registry_status(key).await == "ready" };
    common::eventually(
        Duration::from_secs(20),
        "the ready row written again",
        written,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_lost_during_onboarding_answers_503_and_the_next_attempt_finishes() {
    let mut clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = clickhouse
        .gateway(&issuer)
        .env("CLICKHOUSE__TIMEOUT_SECONDS", 3);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    assert_eq!(gateway.onboard(&token, &instance, 1).await.0, 201);

    let projects: Vec<u64> = (2..12).collect();
    let calls = projects
        .iter()
        .map(|project| gateway.call(Method::PUT, project_path(*project), &token, &instance));
    let onboarding = join_all(calls);
    let crash = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        clickhouse.kill();
    };
    let (answers, ()) = tokio::join!(onboarding, crash);
    for (status, body) in &answers {
        assert!(matches!(status, 201 | 503), "{status} {body}");
        if *status == 503 {
            assert_eq!(body["error"]["code"], "upstream_unavailable");
            assert!(
                !body.to_string().contains("127.0.0.1"),
                "internal details leak: {body}"
            );
        }
    }

    // While it is down: clean refusals and an unready gateway, never a hang.
    let (status, body) = gateway
        .call(Method::PUT, project_path(99), &token, &instance)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("upstream_unavailable"))
    );
    assert_eq!(gateway.readyz().await.0, 503);

    clickhouse.resume().await;
    gateway.wait_ready(Duration::from_secs(30)).await;
    for project in &projects {
        let (status, body) = gateway
            .call(Method::PUT, project_path(*project), &token, &instance)
            .await;
        assert!(matches!(status, 200 | 201), "{project}: {status} {body}");
        assert_eq!(body["status"], "ready");
        let tables = clickhouse
            .query(&format!(
                "EXISTS TABLE {}.snowplow_events",
                body["database"].as_str().unwrap()
            ))
            .await;
        assert_eq!(tables.trim(), "1");
    }
    let statuses = format!(
        "SELECT status, count() FROM monitor_gateway.projects FINAL \
         WHERE instance_id = '{instance}' GROUP BY status FORMAT TSV"
    );
    common::eventually(Duration::from_secs(5), "all 11 projects ready", || async {
        clickhouse.query(&statuses).await.trim() == "ready\t11"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_whose_write_timed_out_never_lets_the_purge_take_a_project_onboarded_again() {
    let clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = clickhouse
        .gateway(&issuer)
        .env("CLICKHOUSE__TIMEOUT_SECONDS", 1)
        .env("TENANTS__DEPROVISION_GRACE_SECONDS", 1)
        .env("TENANTS__PURGE_INTERVAL_SECONDS", 1)
        .env("TENANTS__IDLE_TIMEOUT_SECONDS", 1);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (status, details) = gateway.onboard(&token, &instance, 1).await;
    assert_eq!(status, 201);
    let database = details["database"].as_str().unwrap().to_owned();

    // ClickHouse hangs: the DELETE times out, but its INSERT is buffered and lands later.
    clickhouse.freeze(true);
    let (status, _) = gateway
        .call(Method::DELETE, project_path(1), &token, &instance)
        .await;
    assert_eq!(status, 503);
    clickhouse.freeze(false);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The instance still wants the project: onboarding settles the registry.
    let (status, body) = gateway
        .call(Method::PUT, project_path(1), &token, &instance)
        .await;
    assert!(matches!(status, 200 | 201), "{status} {body}");
    assert_eq!(body["status"], "ready");

    // Past grace period, purge interval and idle timeout, the project and its data remain.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, shown) = gateway
        .call(Method::GET, project_path(1), &token, &instance)
        .await;
    assert_eq!(
        (status, shown["status"].as_str()),
        (200, Some("ready")),
        "{shown}"
    );
    let exists = clickhouse
        .query(&format!("EXISTS TABLE {database}.snowplow_events"))
        .await;
    assert_eq!(exists.trim(), "1");
    let key = details["tenant_key"].as_str().unwrap();
    assert_eq!(clickhouse.registry_status(key).await, "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_whose_write_was_lost_is_written_again_when_repeated() {
    let mut clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = clickhouse
        .gateway(&issuer)
        .env("CLICKHOUSE__TIMEOUT_SECONDS", 1)
        .env("TENANTS__IDLE_TIMEOUT_SECONDS", 1);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (_, details) = gateway.onboard(&token, &instance, 1).await;

    // The DELETE times out and ClickHouse dies before committing it: the write is lost.
    clickhouse.freeze(true);
    let (status, _) = gateway
        .call(Method::DELETE, project_path(1), &token, &instance)
        .await;
    assert_eq!(status, 503);
    clickhouse.kill();
    clickhouse.resume().await;

    // Repeating the DELETE must write it, even though the gateway already holds it as done.
    let (status, body) = gateway
        .call(Method::DELETE, project_path(1), &token, &instance)
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("deprovisioned")),
        "{body}"
    );
    let key = details["tenant_key"].as_str().unwrap();
    assert_eq!(clickhouse.registry_status(key).await, "deprovisioned");

    // After the tenant reloads from the registry, the project is still deprovisioned.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, shown) = gateway
        .call(Method::GET, project_path(1), &token, &instance)
        .await;
    assert_eq!(
        (status, shown["status"].as_str()),
        (200, Some("deprovisioned")),
        "{shown}"
    );
}
