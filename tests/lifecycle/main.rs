//! The project lifecycle against the real ClickHouse: idempotence, concurrency, deprovisioning
//! with a grace period, the purge, quotas, usage, idle tenants and crash recovery.

#[path = "../common/mod.rs"]
mod common;

mod adoption;
mod crashes;
mod replicas;

use std::time::Duration;

use common::{
    Gateway, GatewayOptions, Issuer, clickhouse, event, insert_events, new_instance,
    registry_settles, registry_status, tenant_key,
};
use futures::future::join_all;
use reqwest::Method;
use serde_json::{Value, json};

fn project_path(project: u64) -> String {
    format!("/v1/product-analytics/projects/{project}")
}

async fn database_exists(database: &str) -> bool {
    clickhouse(&format!(
        "SELECT count() FROM system.databases WHERE name = '{database}' FORMAT TSV"
    ))
    .await
    .trim()
        == "1"
}

/// Runs reconciliation on the admin listener and returns its report.
async fn reconcile(gateway: &Gateway) -> Value {
    housekeeping(gateway, "reconcile").await
}

/// Runs the purge on the admin listener and returns its report.
async fn purge(gateway: &Gateway) -> Value {
    housekeeping(gateway, "purge").await
}

async fn housekeeping(gateway: &Gateway, task: &str) -> Value {
    let response = gateway
        .http
        .post(format!("{}/{task}", gateway.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_is_idempotent_stops_queries_and_keeps_the_data() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (_, details) = gateway.onboard(&token, &instance, 11).await;
    let database = details["database"].as_str().unwrap().to_owned();
    insert_events(&database, &vec![event("page_view", "u", "/"); 4]).await;

    let (status, first) = gateway
        .call(Method::DELETE, project_path(11), &token, &instance)
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "deprovisioned");
    let second = gateway
        .call(Method::DELETE, project_path(11), &token, &instance)
        .await;
    assert_eq!(second, (200, first));

    let (status, shown) = gateway
        .call(Method::GET, project_path(11), &token, &instance)
        .await;
    assert_eq!(
        (status, shown["status"].as_str()),
        (200, Some("deprovisioned"))
    );
    let query = json!({ "measures": ["TrackedEvents.count"] });
    let (status, body) = gateway.load(&token, &instance, 11, query).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "project_not_onboarded");
    assert!(
        database_exists(&database).await,
        "the data must outlive the deprovisioning"
    );

    // Onboarding again within the grace period restores the project with its events.
    let (status, restored) = gateway.onboard(&token, &instance, 11).await;
    assert_eq!(status, 201, "{restored}");
    assert_eq!(restored["database"], database);
    assert_eq!(gateway.count_events(&token, &instance, 11).await, (200, 4));

    let (status, body) = gateway
        .call(Method::DELETE, project_path(12), &token, &instance)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("project_not_onboarded"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_puts_create_one_database_and_agree() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);

    let calls = (0..20).map(|_| gateway.onboard(&token, &instance, 500));
    let answers = join_all(calls).await;
    let created = answers.iter().filter(|(status, _)| *status == 201).count();
    let existing = answers.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!((created, existing), (1, 19), "{answers:?}");
    assert!(
        answers.iter().all(|(_, body)| *body == answers[0].1),
        "{answers:?}"
    );

    let key = tenant_key(&instance, 500);
    registry_settles(&key, "ready").await;
    let rows = clickhouse(&format!(
        "SELECT count() FROM monitor_gateway.projects FINAL WHERE tenant_key = '{key}' FORMAT TSV"
    ))
    .await;
    assert_eq!(rows.trim(), "1");
    let databases = clickhouse(&format!(
        "SELECT count() FROM system.databases WHERE name LIKE '%{key}%' FORMAT TSV"
    ))
    .await;
    assert_eq!(databases.trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_put_and_delete_end_consistent() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 600);

    for _ in 0..5 {
        let put = gateway.call(Method::PUT, project_path(600), &token, &instance);
        let delete = gateway.call(Method::DELETE, project_path(600), &token, &instance);
        let ((put_status, _), (delete_status, _)) = tokio::join!(put, delete);
        assert!(matches!(put_status, 200 | 201), "{put_status}");
        assert!(matches!(delete_status, 200 | 404), "{delete_status}");

        let (status, shown) = gateway
            .call(Method::GET, project_path(600), &token, &instance)
            .await;
        assert_eq!(status, 200);
        registry_settles(&key, shown["status"].as_str().unwrap()).await;
        assert!(database_exists(&format!("gitlab_project_{key}")).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_drops_the_database_after_the_grace_period() {
    let issuer = Issuer::start().await;
    let options = GatewayOptions::new(&[&issuer])
        .env("TENANTS__DEPROVISION_GRACE_SECONDS", 1)
        .env("TENANTS__PURGE_INTERVAL_SECONDS", 1);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (_, details) = gateway.onboard(&token, &instance, 21).await;
    let database = details["database"].as_str().unwrap().to_owned();
    insert_events(&database, &[event("page_view", "u", "/")]).await;

    gateway
        .call(Method::DELETE, project_path(21), &token, &instance)
        .await;
    // The purge drops the database, then records the project purged.
    let key = details["tenant_key"].as_str().unwrap();
    let purged =
        || async { !database_exists(&database).await && registry_status(key).await == "purged" };
    common::eventually(
        Duration::from_secs(15),
        "not purged after the grace period",
        purged,
    )
    .await;
    let (status, _) = gateway
        .call(Method::GET, project_path(21), &token, &instance)
        .await;
    assert_eq!(status, 404);

    // Onboarding again starts an empty project.
    let (status, again) = gateway.onboard(&token, &instance, 21).await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(gateway.count_events(&token, &instance, 21).await, (200, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_project_quota_is_enforced_per_instance() {
    let issuer = Issuer::start().await;
    let gateway =
        Gateway::start_with(GatewayOptions::new(&[&issuer]).env("TENANTS__MAX_PROJECTS", 2)).await;
    let (instance, other) = (new_instance(), new_instance());
    let token = issuer.token(&instance);

    assert_eq!(gateway.onboard(&token, &instance, 1).await.0, 201);
    assert_eq!(gateway.onboard(&token, &instance, 2).await.0, 201);
    let response = gateway
        .api(Method::PUT, &project_path(3), &token, &instance)
        .send()
        .await
        .unwrap();
    // Waiting frees no quota, so the refusal names no time to retry after.
    assert_eq!(response.headers().get("retry-after"), None);
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("quota_exceeded")),
        "{body}"
    );
    assert_eq!(
        gateway.onboard(&token, &instance, 2).await.0,
        200,
        "existing projects stay reachable"
    );
    assert_eq!(
        gateway.onboard(&issuer.token(&other), &other, 3).await.0,
        201,
        "quotas are per instance"
    );

    gateway
        .call(Method::DELETE, project_path(1), &token, &instance)
        .await;
    assert_eq!(gateway.onboard(&token, &instance, 3).await.0, 201);

    let (status, list) = gateway
        .call(
            Method::GET,
            "/v1/product-analytics/projects",
            &token,
            &instance,
        )
        .await;
    assert_eq!(status, 200);
    let statuses: Vec<(u64, String)> = list["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["project_id"].as_u64().unwrap(),
                p["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            (1, "deprovisioned".into()),
            (2, "ready".into()),
            (3, "ready".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_the_events_of_a_month_exactly() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (_, details) = gateway.onboard(&token, &instance, 31).await;

    let at = |stamp: &str| {
        let mut e = event("page_view", "u", "/");
        e["collector_tstamp"] = json!(stamp);
        e
    };
    let mut events = vec![at("2026-11-01 00:00:00"); 5];
    events.extend(vec![at("2026-10-31 23:59:59"); 3]);
    events.push(at("2025-11-15 12:00:00"));
    insert_events(details["database"].as_str().unwrap(), &events).await;

    for (year, month, expected) in [(2026, 11, 5), (2026, 10, 3), (2025, 11, 1), (2026, 12, 0)] {
        let path = format!("{}/usage?year={year}&month={month}", project_path(31));
        let (status, body) = gateway.call(Method::GET, &path, &token, &instance).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["events"], expected, "{year}-{month}: {body}");
    }
    for query in [
        "?year=2026&month=1&month=2",
        "?year=2026&year=2025&month=1",
        "",
        "?year=2026",
        "?year=2026&month=13",
        "?year=abc&month=1",
        "?year=1969&month=12",
    ] {
        let path = format!("{}/usage{query}", project_path(31));
        let (status, body) = gateway.call(Method::GET, &path, &token, &instance).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{query}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_can_neither_see_nor_delete_another_instances_project() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let (owner, intruder) = (new_instance(), new_instance());
    let (owner_token, intruder_token) = (issuer.token(&owner), issuer.token(&intruder));
    gateway.onboard(&owner_token, &owner, 41).await;

    for method in [Method::GET, Method::DELETE] {
        let (status, body) = gateway
            .call(method.clone(), project_path(41), &intruder_token, &intruder)
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("project_not_onboarded")),
            "{method}"
        );
    }
    let path = format!("{}/usage?year=2026&month=11", project_path(41));
    assert_eq!(
        gateway
            .call(Method::GET, &path, &intruder_token, &intruder)
            .await
            .0,
        404
    );
    let (_, list) = gateway
        .call(
            Method::GET,
            "/v1/product-analytics/projects",
            &intruder_token,
            &intruder,
        )
        .await;
    assert_eq!(list["projects"], json!([]));

    let (status, shown) = gateway
        .call(Method::GET, project_path(41), &owner_token, &owner)
        .await;
    assert_eq!((status, shown["status"].as_str()), (200, Some("ready")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tenant_actors_stop_and_come_back_on_demand() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start_with(
        GatewayOptions::new(&[&issuer]).env("TENANTS__IDLE_TIMEOUT_SECONDS", 1),
    )
    .await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (_, first) = gateway.onboard(&token, &instance, 51).await;

    let idle = || async {
        let metrics = gateway.metrics().await;
        metrics
            .lines()
            .any(|line| line == "monitor_gateway_tenant_actors 0")
    };
    common::eventually(Duration::from_secs(10), "tenant actors still running", idle).await;
    let (status, shown) = gateway
        .call(Method::GET, project_path(51), &token, &instance)
        .await;
    assert_eq!((status, &shown), (200, &first));
}
