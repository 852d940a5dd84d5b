//! Issuers' key sets over real HTTP: outages at and after start, broken or empty key sets,
//! discovery documents, several issuers, and what the gateway reports about them.

mod common;

use std::time::{Duration, Instant};

use common::issuer::{IssuerMode, sign_with};
use common::{Gateway, GatewayOptions, Issuer, metric, new_instance};
use reqwest::Method;
use serde_json::{Value, json};

const PATH: &str = "/v1/product-analytics/projects/1";

async fn outcome(gateway: &Gateway, token: &str, instance: &str) -> (u16, String) {
    outcome_with(gateway, token, instance, &[]).await
}

async fn outcome_with(
    gateway: &Gateway,
    token: &str,
    instance: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut request = gateway.api(Method::GET, PATH, token, instance);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("none").to_owned(),
    )
}

/// A request that passes authentication reaches the handler, which finds no such project.
const ACCEPTED: (u16, &str) = (404, "project_not_onboarded");

fn accepted() -> (u16, String) {
    (ACCEPTED.0, ACCEPTED.1.to_owned())
}

/// Makes the gateway fetch the issuer's key set now, through a token naming an unknown kid.
async fn force_refresh(gateway: &Gateway, issuer: &Issuer, instance: &str) {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut key = issuer.signing_key();
    key.kid = format!("unknown-{}", uuid::Uuid::new_v4());
    let token = sign_with(&key, &issuer.claims(instance));
    assert_eq!(
        outcome(gateway, &token, instance).await,
        (401, "unknown_key".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_down_at_start_keeps_the_gateway_unready_until_it_answers() {
    let issuer = Issuer::start_with_mode(IssuerMode::Down).await;
    let gateway = Gateway::start_with(GatewayOptions::new(&[&issuer]).unready()).await;
    let instance = new_instance();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = gateway.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reasons"].to_string().contains("signing keys"),
        "{body}"
    );

    let response = gateway
        .api(Method::GET, PATH, &issuer.token(&instance), &instance)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "keys_unavailable");

    issuer.set_mode(IssuerMode::Serving);
    gateway.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(
        outcome(&gateway, &issuer.token(&instance), &instance).await,
        accepted()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_down_after_start_does_not_stop_service() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();

    issuer.set_mode(IssuerMode::Down);
    force_refresh(&gateway, &issuer, &instance).await;

    // A token never seen before still verifies with the last good key set.
    assert_eq!(
        outcome(&gateway, &issuer.token(&instance), &instance).await,
        accepted()
    );
    assert_eq!(gateway.readyz().await.0, 200);
    let metrics = gateway.metrics().await;
    assert!(
        metric(
            &metrics,
            "monitor_gateway_jwks_refresh_total",
            &["outcome=\"bad_status\""]
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_or_broken_key_sets_never_replace_the_last_good_one() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();

    for (mode, reason) in [
        (IssuerMode::Empty, "empty"),
        (IssuerMode::Garbage, "malformed"),
    ] {
        issuer.set_mode(mode);
        force_refresh(&gateway, &issuer, &instance).await;
        assert_eq!(
            outcome(&gateway, &issuer.token(&instance), &instance).await,
            accepted(),
            "{mode:?}"
        );
        let metrics = gateway.metrics().await;
        let label = format!("outcome=\"{reason}\"");
        assert!(
            metric(&metrics, "monitor_gateway_jwks_refresh_total", &[&label]) >= 1.0,
            "{mode:?}: {metrics}"
        );
        assert_eq!(
            metric(&metrics, "monitor_gateway_jwks_keys", &[]),
            1.0,
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_one_issuer_never_verifies_a_token_claiming_another() {
    let (a, b) = (Issuer::start().await, Issuer::start().await);
    let gateway = Gateway::start(&[&a, &b]).await;
    let instance = new_instance();

    assert_eq!(
        outcome(&gateway, &a.token(&instance), &instance).await,
        accepted()
    );
    assert_eq!(
        outcome(&gateway, &b.token(&instance), &instance).await,
        accepted()
    );

    let claims_of_b = b.claims(&instance);
    let forged = sign_with(&a.signing_key(), &claims_of_b);
    assert_eq!(
        outcome(&gateway, &forged, &instance).await,
        (401, "unknown_key".into())
    );

    // Even when issuer B publishes a key under the same kid, A's signature does not verify.
    let mut impostor = b.signing_key();
    impostor.kid = a.signing_key().kid;
    let mut claims_of_a = a.claims(&instance);
    claims_of_a["iss"] = json!(b.issuer);
    let crossed = sign_with(&a.signing_key(), &claims_of_a);
    assert_eq!(outcome(&gateway, &crossed, &instance).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuers_can_be_configured_by_their_discovery_document() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start_with(GatewayOptions::new(&[&issuer]).discovery()).await;
    let instance = new_instance();
    assert_eq!(
        outcome(&gateway, &issuer.token(&instance), &instance).await,
        accepted()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_realm_and_authentication_type_headers_are_checked() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let (sub, uid) = (new_instance(), new_instance());

    let mut claims = issuer.claims(&sub);
    claims["gitlab_instance_uid"] = json!(uid);
    let token = issuer.sign(&claims);
    assert_eq!(outcome(&gateway, &token, &uid).await, accepted());
    assert_eq!(
        outcome(&gateway, &token, &sub).await,
        (401, "instance_mismatch".into())
    );
    assert_eq!(
        outcome(&gateway, &token, &uid.to_uppercase()).await,
        accepted()
    );

    let ok = [
        ("X-Gitlab-Realm", "self-managed"),
        ("X-Gitlab-Authentication-Type", "oidc"),
    ];
    assert_eq!(outcome_with(&gateway, &token, &uid, &ok).await, accepted());
    let basic = [("X-Gitlab-Authentication-Type", "basic")];
    assert_eq!(
        outcome_with(&gateway, &token, &uid, &basic).await,
        (401, "unsupported_authentication_type".into())
    );

    let mut future_iat = issuer.claims(&sub);
    future_iat["iat"] = json!(common::issuer::now() + 3600);
    assert_eq!(
        outcome(&gateway, &issuer.sign(&future_iat), &sub).await,
        (401, "token_not_yet_valid".into())
    );

    let mut not_uuid = issuer.claims("not-a-uuid");
    not_uuid["sub"] = json!("not-a-uuid");
    assert_eq!(
        outcome(&gateway, &issuer.sign(&not_uuid), "not-a-uuid").await,
        (401, "malformed_token".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_tokens_hit_the_verified_token_cache_and_outcomes_are_counted() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);

    for _ in 0..5 {
        assert_eq!(outcome(&gateway, &token, &instance).await, accepted());
    }
    // The header check still applies to a cached token.
    assert_eq!(
        outcome(&gateway, &token, &new_instance()).await,
        (401, "instance_mismatch".into())
    );

    let metrics = gateway.metrics().await;
    assert!(
        metric(
            &metrics,
            "monitor_gateway_auth_token_cache_total",
            &["result=\"hit\""]
        ) >= 5.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "monitor_gateway_auth_token_cache_total",
            &["result=\"miss\""]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "monitor_gateway_auth_total",
            &["outcome=\"ok\"", "realm=\"self-managed\""]
        ),
        5.0
    );
    assert_eq!(
        metric(
            &metrics,
            "monitor_gateway_auth_total",
            &["outcome=\"instance_mismatch\""]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_every_call_is_verified() {
    let issuer = Issuer::start().await;
    let gateway =
        Gateway::start_with(GatewayOptions::new(&[&issuer]).env("AUTH__TOKEN_CACHE_CAPACITY", 0))
            .await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    for _ in 0..3 {
        assert_eq!(outcome(&gateway, &token, &instance).await, accepted());
    }
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(&metrics, "monitor_gateway_auth_token_cache_total", &[]),
        0.0,
        "{metrics}"
    );
    let started = Instant::now();
    assert_eq!(outcome(&gateway, &token, &instance).await, accepted());
    assert!(started.elapsed() < Duration::from_secs(5));
}
