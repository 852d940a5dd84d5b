//! Load limits on the query path: the per-instance rate limit and the dispatcher's bounded
//! queue, against the real Cube.

mod common;

use std::time::Duration;

use common::{Gateway, GatewayOptions, Issuer, new_instance};
use futures::future::join_all;
use reqwest::Method;
use serde_json::Value;

const META: &str = "/v1/product-analytics/projects/1/cubejs-api/v1/meta";

async fn meta(gateway: &Gateway, token: &str, instance: &str) -> (u16, Option<String>, Value) {
    let response = gateway
        .api(Method::GET, META, token, instance)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        retry_after,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_beyond_its_query_rate_gets_429_with_retry_after() {
    let issuer = Issuer::start().await;
    let options = GatewayOptions::new(&[&issuer])
        .env("TENANTS__QUERY_RATE_PER_SECOND", 0.2)
        .env("TENANTS__QUERY_BURST", 2);
    let gateway = Gateway::start_with(options).await;
    let (busy, quiet) = (new_instance(), new_instance());
    let (busy_token, quiet_token) = (issuer.token(&busy), issuer.token(&quiet));
    gateway.onboard(&busy_token, &busy, 1).await;
    gateway.onboard(&quiet_token, &quiet, 1).await;

    assert_eq!(meta(&gateway, &busy_token, &busy).await.0, 200);
    assert_eq!(meta(&gateway, &busy_token, &busy).await.0, 200);
    let (status, retry_after, body) = meta(&gateway, &busy_token, &busy).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );
    let seconds: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=5).contains(&seconds), "{seconds}");

    // Limits are per instance.
    assert_eq!(meta(&gateway, &quiet_token, &quiet).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_queue_is_shed_cleanly_and_nothing_hangs() {
    let issuer = Issuer::start().await;
    let options = GatewayOptions::new(&[&issuer])
        .env("CUBE__MAX_CONCURRENT_QUERIES", 1)
        .env("CUBE__MAX_QUEUED_QUERIES", 0)
        // Identical requests would share one answer; here each must take a worker.
        .env("CUBE__RESULT_CACHE_SECONDS", 0)
        // The instance's own share of places must not be what refuses them.
        .env("TENANTS__MAX_CONCURRENT_QUERIES", 1000);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    gateway.onboard(&token, &instance, 1).await;

    let burst = (0..40).map(|_| meta(&gateway, &token, &instance));
    let answers = tokio::time::timeout(Duration::from_secs(60), join_all(burst))
        .await
        .expect("every request of the burst is answered");

    let ok = answers
        .iter()
        .filter(|(status, _, _)| *status == 200)
        .count();
    let shed: Vec<_> = answers
        .iter()
        .filter(|(status, _, _)| *status == 503)
        .collect();
    assert_eq!(
        ok + shed.len(),
        answers.len(),
        "only 200 and 503: {answers:?}"
    );
    assert!(ok >= 1, "{answers:?}");
    assert!(
        !shed.is_empty(),
        "a burst of 40 against one place shed nothing"
    );
    for (_, retry_after, body) in shed {
        assert_eq!(body["error"]["code"], "overloaded");
        assert!(retry_after.is_some());
    }
    // The dispatcher recovers at once.
    assert_eq!(meta(&gateway, &token, &instance).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_cannot_hold_more_than_its_share_of_queries_in_flight() {
    let issuer = Issuer::start().await;
    let options = GatewayOptions::new(&[&issuer])
        .env("TENANTS__MAX_CONCURRENT_QUERIES", 2)
        // One worker, so the busy instance's queries wait in the queue, holding their places.
        .env("CUBE__MAX_CONCURRENT_QUERIES", 1)
        .env("CUBE__MAX_QUEUED_QUERIES", 100)
        .env("CUBE__RESULT_CACHE_SECONDS", 0);
    let gateway = Gateway::start_with(options).await;
    let (busy, quiet) = (new_instance(), new_instance());
    let (busy_token, quiet_token) = (issuer.token(&busy), issuer.token(&quiet));
    gateway.onboard(&busy_token, &busy, 1).await;
    gateway.onboard(&quiet_token, &quiet, 1).await;

    let burst = (0..30).map(|_| meta(&gateway, &busy_token, &busy));
    let others = (0..2).map(|_| meta(&gateway, &quiet_token, &quiet));
    let (burst, others) = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join(join_all(burst), join_all(others)),
    )
    .await
    .expect("every request is answered");

    let ok = burst.iter().filter(|(status, _, _)| *status == 200).count();
    let refused: Vec<_> = burst
        .iter()
        .filter(|(status, _, _)| *status == 429)
        .collect();
    assert_eq!(
        ok + refused.len(),
        burst.len(),
        "only 200 and 429: {burst:?}"
    );
    assert!(ok >= 2, "{burst:?}");
    assert!(
        refused.len() >= 10,
        "30 at once against a share of 2 refused only {}",
        refused.len()
    );
    for (_, retry_after, body) in &refused {
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("already has 2 queries at Cube"),
            "{message}"
        );
        assert_eq!(retry_after.as_deref(), Some("1"));
    }
    // The other instance had its own share the whole time.
    for (status, _, body) in &others {
        assert_eq!(*status, 200, "{body}");
    }
    let metrics = gateway.metrics().await;
    let counted: u64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("monitor_gateway_queries_refused_total{reason=\"concurrency\"} ")
        })
        .expect("the refusals are counted")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(counted, refused.len() as u64);
    // Places are given back: the busy instance is served again.
    assert_eq!(meta(&gateway, &busy_token, &busy).await.0, 200);
}
