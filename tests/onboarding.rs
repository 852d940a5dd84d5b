//! Onboarding against the real ClickHouse: databases, tables, the registry and idempotence.

mod common;

use common::{Gateway, Issuer, clickhouse, new_instance, tenant_key};
use reqwest::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_creates_the_database_and_a_second_put_returns_the_same_details() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 42);

    let (status, first) = gateway.onboard(&token, &instance, 42).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["tenant_key"], key);
    assert_eq!(first["database"], format!("gitlab_project_{key}"));
    assert_eq!(first["app_id"], key);
    assert_eq!(first["project_id"], 42);
    assert_eq!(first["instance_id"], instance);
    assert_eq!(first["status"], "ready");
    assert_eq!(
        first["query_url"],
        "http://gateway.test/v1/product-analytics/projects/42/cubejs-api/v1"
    );
    assert_eq!(first["collector_url"], "http://gateway.test/collector");
    assert!(
        first["created_at"].as_str().unwrap().ends_with('Z'),
        "{first}"
    );

    let tables = clickhouse(&format!(
        "SELECT name FROM system.tables WHERE database = 'gitlab_project_{key}' FORMAT TSV"
    ))
    .await;
    assert_eq!(tables.trim(), "snowplow_events");
    common::registry_settles(&key, "ready").await;

    let (status, second) = gateway.onboard(&token, &instance, 42).await;
    assert_eq!(status, 200);
    assert_eq!(second, first);

    let shown = gateway.call(
        Method::GET,
        "/v1/product-analytics/projects/42",
        &token,
        &instance,
    );
    assert_eq!(shown.await, (200, first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_a_gateway_restart() {
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);

    let mut gateway = Gateway::start(&[&issuer]).await;
    let (status, first) = gateway.onboard(&token, &instance, 7).await;
    assert_eq!(status, 201);
    gateway.kill();

    let gateway = Gateway::start(&[&issuer]).await;
    let shown = gateway.call(
        Method::GET,
        "/v1/product-analytics/projects/7",
        &token,
        &instance,
    );
    assert_eq!(shown.await, (200, first.clone()));
    let (status, again) = gateway.onboard(&token, &instance, 7).await;
    assert_eq!((status, again), (200, first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_not_onboarded_is_404_and_invalid_ids_are_400() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);

    let (status, body) = gateway
        .call(
            Method::GET,
            "/v1/product-analytics/projects/5",
            &token,
            &instance,
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "project_not_onboarded");

    for bad in [
        "0",
        "-1",
        "abc",
        "18446744073709551616",
        "01",
        "1.5",
        "",
        "%2B1",
    ] {
        let path = format!("/v1/product-analytics/projects/{bad}");
        let (status, body) = gateway.call(Method::PUT, path, &token, &instance).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"]["code"], "invalid_project_id", "{bad}");
    }
}
