//! The per-tenant result cache in front of the real Cube: shared answers within a tenant,
//! never across tenants, one Cube request for a burst, and a bypass.

mod common;

use std::time::Duration;

use common::{Gateway, GatewayOptions, Issuer, event, insert_events, member, metric, new_instance};
use futures::future::join_all;
use reqwest::Method;
use serde_json::{Value, json};

const LOAD: &str = "/v1/product-analytics/projects/1/cubejs-api/v1/load";

async fn cube_requests(gateway: &Gateway) -> f64 {
    metric(
        &gateway.metrics().await,
        "monitor_gateway_cube_requests_total",
        &["endpoint=\"load\""],
    )
}

async fn load(gateway: &Gateway, token: &str, instance: &str, fresh: bool) -> (u16, Value) {
    let mut request = gateway
        .api(Method::POST, LOAD, token, instance)
        .json(&json!({ "query": { "measures": ["TrackedEvents.count"] } }));
    if fresh {
        request = request.header("Cache-Control", "no-cache");
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_queries_share_one_cube_answer_within_a_tenant_only() {
    let issuer = Issuer::start().await;
    let gateway =
        Gateway::start_with(GatewayOptions::new(&[&issuer]).env("CUBE__RESULT_CACHE_SECONDS", 3))
            .await;
    let (a, b) = (new_instance(), new_instance());
    let (token_a, token_b) = (issuer.token(&a), issuer.token(&b));
    let (_, details_a) = gateway.onboard(&token_a, &a, 1).await;
    let (_, details_b) = gateway.onboard(&token_b, &b, 1).await;
    insert_events(
        details_a["database"].as_str().unwrap(),
        &vec![event("page_view", "u", "/"); 2],
    )
    .await;
    insert_events(
        details_b["database"].as_str().unwrap(),
        &vec![event("page_view", "u", "/"); 5],
    )
    .await;

    // The same query from two tenants: each gets its own answer.
    assert_eq!(gateway.count_events(&token_a, &a, 1).await, (200, 2));
    assert_eq!(gateway.count_events(&token_b, &b, 1).await, (200, 5));
    assert_eq!(gateway.count_events(&token_a, &a, 1).await, (200, 2));

    // A kept answer costs Cube nothing; a bypass asks again and renews it.
    let before = cube_requests(&gateway).await;
    let (status, body) = load(&gateway, &token_a, &a, false).await;
    assert_eq!(
        (status, member(&body, "TrackedEvents.count")),
        (200, 2),
        "{body}"
    );
    assert_eq!(cube_requests(&gateway).await, before);
    let (status, body) = load(&gateway, &token_a, &a, true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cube_requests(&gateway).await, before + 1.0);

    // Once the window is over, a burst of identical queries reaches Cube once.
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    let before = cube_requests(&gateway).await;
    let burst = (0..20).map(|_| load(&gateway, &token_a, &a, false));
    let answers = join_all(burst).await;
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    assert!(
        answers
            .iter()
            .all(|(_, body)| body["error"] == "Continue wait"
                || member(body, "TrackedEvents.count") == 2),
        "{answers:?}"
    );
    assert_eq!(cube_requests(&gateway).await, before + 1.0, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_errors_are_never_kept() {
    let issuer = Issuer::start().await;
    let gateway =
        Gateway::start_with(GatewayOptions::new(&[&issuer]).env("CUBE__RESULT_CACHE_SECONDS", 10))
            .await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    gateway.onboard(&token, &instance, 1).await;

    let bad = json!({ "query": { "measures": ["TrackedEvents.noSuchMeasure"] } });
    let before = cube_requests(&gateway).await;
    for _ in 0..2 {
        let response = gateway
            .api(Method::POST, LOAD, &token, &instance)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
    }
    assert_eq!(cube_requests(&gateway).await, before + 2.0);
}
