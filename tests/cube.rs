//! The gateway in front of a Cube of the test's own: Cube going away and coming back.

mod common;

use std::time::{Duration, Instant};

use common::cube::PrivateCube;
use common::{Scene, event, eventually, insert_events};
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cube_stopped_answers_502_and_queries_recover_when_it_is_back() {
    let mut cube = PrivateCube::start().await;
    // No result cache: every answer below comes from Cube as it is at that moment.
    let env = [
        ("CUBE__URL", cube.url()),
        ("CUBE__RESULT_CACHE_SECONDS", "0".to_owned()),
    ];
    let Scene {
        gateway,
        instance,
        token,
        details,
        ..
    } = Scene::with_env(1, &vec![event("page_view", "u", "/"); 4], &env).await;
    let database = details["database"].as_str().unwrap().to_owned();
    assert_eq!(gateway.count_events(&token, &instance, 1).await, (200, 4));

    cube.kill();
    let started = Instant::now();
    let response = gateway
        .api(
            Method::POST,
            "/v1/product-analytics/projects/1/cubejs-api/v1/load",
            &token,
            &instance,
        )
        .json(&json!({ "query": { "measures": ["TrackedEvents.count"] } }))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 502);
    assert!(
        elapsed < Duration::from_secs(5),
        "answered after {elapsed:?}"
    );
    assert!(response.headers().contains_key("retry-after"));
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(!message.is_empty(), "{body}");
    assert!(
        !message.contains(&cube.port.to_string()),
        "Cube's address leaked: {body}"
    );

    let (status, body) = gateway.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready", "{body}");
    let reasons = body["reasons"].as_array().unwrap();
    assert!(
        reasons.len() == 1 && reasons[0].as_str().unwrap().starts_with("Cube: "),
        "{body}"
    );

    // Events that arrive while Cube is away are counted once it is back.
    insert_events(&database, &vec![event("page_view", "u", "/"); 3]).await;
    cube.resume().await;
    eventually(Duration::from_secs(30), "queries recover", || async {
        gateway.count_events(&token, &instance, 1).await == (200, 7)
    })
    .await;
    let (status, body) = gateway.readyz().await;
    assert_eq!(status, 200, "{body}");
}
