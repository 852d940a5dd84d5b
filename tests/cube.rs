//! The gateway in front of a Cube of the test's own: Cube going away and coming back, and Cube
//! answering "Continue wait" while a slow query runs.

mod common;

use std::time::{Duration, Instant};

use common::cube::PrivateCube;
use common::{Scene, event, eventually, insert_events, member, metric};
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

const LOAD: &str = "/v1/product-analytics/projects/1/cubejs-api/v1/load";
const SLOW_COUNT: &str = "SlowEvents.count";

/// A Cube that says "Continue wait" after 1 s and whose `SlowEvents` queries take about 7.5 s
/// (tests/cube-slow), and a gateway in front of it with project 1 holding `events` events.
async fn slow_cube_scene(events: usize) -> (PrivateCube, Scene) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cube-slow");
    let cube = PrivateCube::start_from(&dir, "warn").await;
    let env = [("CUBE__URL", cube.url())];
    let scene = Scene::with_env(1, &vec![event("page_view", "u", "/"); events], &env).await;
    (cube, scene)
}

/// One `load` of `SlowEvents.count`, as a caller that does not poll by itself sends it.
async fn load_slow_count(scene: &Scene, prefer: Option<&str>) -> (u16, Value) {
    let mut request = scene
        .gateway
        .api(Method::POST, LOAD, &scene.token, &scene.instance)
        .json(&json!({ "query": { "measures": [SLOW_COUNT] } }));
    if let Some(prefer) = prefer {
        request = request.header("Prefer", prefer);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn is_continue_wait(body: &Value) -> bool {
    body["error"] == "Continue wait" && body.get("data").is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cubes_client_polls_through_continue_wait_to_the_right_result() {
    let (_cube, scene) = slow_cube_scene(6).await;
    let query_url = scene.details["query_url"]
        .as_str()
        .unwrap()
        .replace("http://gateway.test", &scene.gateway.url);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cube-client/check.js");

    let output = tokio::process::Command::new("node")
        .arg(script)
        .args([&query_url, &scene.token, &scene.instance, SLOW_COUNT])
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs (scripts/test.sh installs the client)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["cubes"], json!(["SlowEvents"]), "{answer}");
    assert_eq!(answer["count"], 6, "{answer}");
    assert!(
        answer["continue_waits"].as_u64().unwrap() >= 1,
        "Cube never answered Continue wait: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_wait_reaches_a_raw_caller_as_200_and_asking_again_gets_the_data() {
    let (_cube, scene) = slow_cube_scene(4).await;

    let (status, body) = load_slow_count(&scene, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(is_continue_wait(&body), "{body}");

    // Asking again joins the query Cube is running; within a few asks the data is there.
    let mut asks = 1;
    let body = loop {
        let (status, body) = load_slow_count(&scene, None).await;
        asks += 1;
        assert_eq!(status, 200, "{body}");
        if !is_continue_wait(&body) {
            break body;
        }
        assert!(asks < 30, "still Continue wait after {asks} asks");
    };
    assert_eq!(member(&body, SLOW_COUNT), 4, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_wait_waits_out_continue_wait_and_answers_the_data() {
    let (_cube, scene) = slow_cube_scene(3).await;
    let cube_loads = |text: String| {
        metric(
            &text,
            "monitor_gateway_cube_requests_total",
            &["endpoint=\"load\""],
        )
    };
    let before = cube_loads(scene.gateway.metrics().await);

    let started = Instant::now();
    let (status, body) = load_slow_count(&scene, Some("wait=20")).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(member(&body, SLOW_COUNT), 3, "{body}");
    // Longer than Node's default 5 s socket timeout, which must not cut Cube off ClickHouse.
    assert!(
        elapsed > Duration::from_secs(5) && elapsed < Duration::from_secs(20),
        "answered after {elapsed:?}"
    );

    // One call of the caller's, and the gateway asked Cube again after a "Continue wait".
    let asked = cube_loads(scene.gateway.metrics().await) - before;
    assert!(asked >= 2.0, "the gateway asked Cube {asked} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_hangs_up_keeps_its_place_until_cube_is_done() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cube-slow");
    let cube = PrivateCube::start_from(&dir, "warn").await;
    let env = [
        ("CUBE__URL", cube.url()),
        ("CUBE__RESULT_CACHE_SECONDS", "0".to_owned()),
        ("TENANTS__MAX_CONCURRENT_QUERIES", "1".to_owned()),
    ];
    let scene = Scene::with_env(1, &vec![event("page_view", "u", "/"); 2], &env).await;
    let meta = || async {
        scene
            .gateway
            .api(
                Method::GET,
                "/v1/product-analytics/projects/1/cubejs-api/v1/meta",
                &scene.token,
                &scene.instance,
            )
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(meta().await, 200);

    // Cube works on this for about a second (then says "Continue wait"); the caller leaves.
    let gone = scene
        .gateway
        .api(Method::POST, LOAD, &scene.token, &scene.instance)
        .json(&json!({ "query": { "measures": [SLOW_COUNT] } }))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.is_err(), "{gone:?}");

    // The instance's one place is still taken while Cube works on the abandoned request.
    assert_eq!(meta().await, 429);
    eventually(
        Duration::from_secs(15),
        "the place never came back",
        || async { meta().await == 200 },
    )
    .await;
}
