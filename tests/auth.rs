//! Cloud Connector authentication, against a local issuer serving a real JWKS over HTTP.

mod common;

use common::issuer::{IssuerKey, now, sign_with};
use common::{Gateway, Issuer, new_instance};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

const PATH: &str = "/v1/product-analytics/projects/1";

/// Calls the API with a raw Authorization value and instance header; returns status and code.
async fn call(
    gateway: &Gateway,
    authorization: Option<&str>,
    instance: Option<&str>,
) -> (u16, String) {
    let mut request = gateway
        .http
        .request(Method::GET, format!("{}{PATH}", gateway.url));
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    if let Some(instance) = instance {
        request = request.header("X-Gitlab-Instance-Id", instance);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("none").to_owned(),
    )
}

async fn with_token(gateway: &Gateway, token: &str, instance: &str) -> (u16, String) {
    call(gateway, Some(&format!("Bearer {token}")), Some(instance)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_required_refusals_carry_their_status_and_code() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();

    // A valid token reaches the handler: the project is simply not onboarded.
    assert_eq!(
        with_token(&gateway, &issuer.token(&instance), &instance).await,
        (404, "project_not_onboarded".into())
    );

    assert_eq!(
        call(&gateway, None, Some(&instance)).await,
        (401, "missing_token".into())
    );

    let stranger = IssuerKey::generate();
    let mut forged = stranger.clone();
    forged.kid = issuer.signing_key().kid;
    let bad_signature = sign_with(&forged, &issuer.claims(&instance));
    assert_eq!(
        with_token(&gateway, &bad_signature, &instance).await,
        (401, "invalid_signature".into())
    );

    let mut expired = issuer.claims(&instance);
    expired["exp"] = json!(now() - 3600);
    expired["iat"] = json!(now() - 7200);
    expired["nbf"] = json!(now() - 7200);
    assert_eq!(
        with_token(&gateway, &issuer.sign(&expired), &instance).await,
        (401, "token_expired".into())
    );

    let other = new_instance();
    assert_eq!(
        with_token(&gateway, &issuer.token(&instance), &other).await,
        (401, "instance_mismatch".into())
    );
    assert_eq!(
        call(
            &gateway,
            Some(&format!("Bearer {}", issuer.token(&instance))),
            None
        )
        .await
        .1,
        "instance_mismatch"
    );

    let mut no_scope = issuer.claims(&instance);
    no_scope["scopes"] = json!(["duo_chat"]);
    assert_eq!(
        with_token(&gateway, &issuer.sign(&no_scope), &instance).await,
        (403, "missing_scope".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_malformed_tokens_are_refused() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let claims = issuer.claims(&instance);

    let mut wrong_audience = claims.clone();
    wrong_audience["aud"] = json!("someone-else");
    assert_eq!(
        with_token(&gateway, &issuer.sign(&wrong_audience), &instance).await,
        (401, "wrong_audience".into())
    );

    let mut audience_array = claims.clone();
    audience_array["aud"] = json!(["other", "gitlab-monitor-gateway"]);
    assert_eq!(
        with_token(&gateway, &issuer.sign(&audience_array), &instance)
            .await
            .1,
        "project_not_onboarded"
    );

    let mut unknown_issuer = claims.clone();
    unknown_issuer["iss"] = json!("https://evil.example");
    assert_eq!(
        with_token(&gateway, &issuer.sign(&unknown_issuer), &instance).await,
        (401, "unknown_issuer".into())
    );

    let mut future = claims.clone();
    future["nbf"] = json!(now() + 3600);
    assert_eq!(
        with_token(&gateway, &issuer.sign(&future), &instance).await,
        (401, "token_not_yet_valid".into())
    );
    let mut within_leeway = claims.clone();
    within_leeway["nbf"] = json!(now() + 20);
    assert_eq!(
        with_token(&gateway, &issuer.sign(&within_leeway), &instance)
            .await
            .1,
        "project_not_onboarded"
    );

    let segment = |value: &Value| base64_url(value.to_string().as_bytes());
    let alg_none = format!(
        "{}.{}.",
        segment(&json!({"alg": "none", "typ": "JWT"})),
        segment(&claims)
    );
    assert_eq!(
        with_token(&gateway, &alg_none, &instance).await,
        (401, "malformed_token".into())
    );

    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(issuer.signing_key().kid);
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &claims,
        &EncodingKey::from_secret(&issuer.signing_key().public_modulus).unwrap(),
    )
    .unwrap();
    assert_eq!(
        with_token(&gateway, &hs256, &instance).await,
        (401, "invalid_signature".into())
    );

    let no_kid = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &issuer.signing_key().encoding,
    )
    .unwrap();
    assert_eq!(
        with_token(&gateway, &no_kid, &instance).await,
        (401, "malformed_token".into())
    );

    let mut unknown_kid = issuer.signing_key();
    unknown_kid.kid = "no-such-kid".into();
    assert_eq!(
        with_token(&gateway, &sign_with(&unknown_kid, &claims), &instance).await,
        (401, "unknown_key".into())
    );

    for (authorization, code) in [
        ("Bearer !!!.@@@.###", "malformed_token"),
        ("Bearer ", "missing_token"),
        ("Bearer opaque-api-key-1234", "malformed_token"),
        ("Basic dXNlcjpwYXNz", "malformed_token"),
    ] {
        assert_eq!(
            call(&gateway, Some(authorization), Some(&instance)).await,
            (401, code.into()),
            "{authorization}"
        );
    }
    let huge = format!("Bearer {}", "a".repeat(20_000));
    assert_eq!(
        call(&gateway, Some(&huge), Some(&instance)).await,
        (401, "malformed_token".into())
    );

    let response = gateway
        .api(Method::GET, PATH, &issuer.token(&instance), &instance)
        .header("X-Gitlab-Realm", "dedicated")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "realm_mismatch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_accepted_within_seconds_without_a_restart() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    assert_eq!(
        with_token(&gateway, &issuer.token(&instance), &instance)
            .await
            .0,
        404
    );

    issuer.rotate();
    let rotated = issuer.token(&instance);
    let started = std::time::Instant::now();
    loop {
        let outcome = with_token(&gateway, &rotated, &instance).await;
        if outcome == (404, "project_not_onboarded".into()) {
            break;
        }
        assert_eq!(outcome, (401, "unknown_key".into()));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "rotated key still refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_unknown_kids_cause_a_bounded_number_of_issuer_fetches() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let before = issuer.requests();

    let started = std::time::Instant::now();
    let mut key = issuer.signing_key();
    for i in 0..200 {
        key.kid = format!("garbage-{i}");
        let token = sign_with(&key, &issuer.claims(&instance));
        assert_eq!(
            with_token(&gateway, &token, &instance).await,
            (401, "unknown_key".into())
        );
    }
    // At most one fetch per second (the configured minimum interval), plus the deferred one.
    let allowed = started.elapsed().as_secs() as usize + 2;
    let fetches = issuer.requests() - before;
    assert!(
        fetches <= allowed,
        "{fetches} fetches for 200 unknown kids, allowed {allowed}"
    );
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_headers_sent_twice_or_not_ascii_are_refused() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let (instance, other) = (new_instance(), new_instance());
    let token = issuer.token(&instance);
    let url = format!("{}{PATH}", gateway.url);
    let code_of = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        (
            status,
            body["error"]["code"].as_str().unwrap_or("none").to_owned(),
        )
    };

    let mut headers = reqwest::header::HeaderMap::new();
    headers.append("authorization", format!("Bearer {token}").parse().unwrap());
    headers.append(
        "authorization",
        format!("Bearer {}", issuer.token(&other)).parse().unwrap(),
    );
    headers.append("x-gitlab-instance-id", instance.parse().unwrap());
    let response = gateway
        .http
        .get(&url)
        .headers(headers)
        .send()
        .await
        .unwrap();
    assert_eq!(code_of(response).await, (401, "malformed_token".into()));

    let mut headers = reqwest::header::HeaderMap::new();
    headers.append("x-gitlab-instance-id", instance.parse().unwrap());
    headers.append("x-gitlab-instance-id", other.parse().unwrap());
    let response = gateway
        .http
        .get(&url)
        .bearer_auth(&token)
        .headers(headers)
        .send()
        .await
        .unwrap();
    assert_eq!(code_of(response).await, (401, "instance_mismatch".into()));

    let binary = reqwest::header::HeaderValue::from_bytes(b"self-\xffmanaged").unwrap();
    let response = gateway
        .api(Method::GET, PATH, &token, &instance)
        .header("x-gitlab-realm", binary)
        .send()
        .await
        .unwrap();
    assert_eq!(code_of(response).await, (401, "realm_mismatch".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_when_plain_and_replaced_otherwise() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let url = format!("{}/.well-known/jwks.json", gateway.url);

    let plain = gateway
        .http
        .get(&url)
        .header("x-request-id", "abc-123_x.y")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.headers()["x-request-id"], "abc-123_x.y");
    for hostile in ["has space", "quote\"s", &"x".repeat(300)] {
        let response = gateway
            .http
            .get(&url)
            .header("x-request-id", hostile)
            .send()
            .await
            .unwrap();
        let echoed = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_ne!(echoed, hostile);
        assert_eq!(echoed.len(), 36, "a generated UUID: {echoed}");
    }

    let response = gateway
        .http
        .patch(format!("{}{PATH}", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_declared_body_is_refused_before_it_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    gateway.onboard(&token, &instance, 1).await;

    // Routes that read a body and routes that ignore one alike.
    let address = gateway.url.trim_start_matches("http://").to_owned();
    for (method, path) in [
        (
            "POST",
            "/v1/product-analytics/projects/1/cubejs-api/v1/load",
        ),
        ("PUT", "/v1/product-analytics/projects/2"),
    ] {
        let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\n\
             Authorization: Bearer {token}\r\nX-Gitlab-Instance-Id: {instance}\r\n\
             Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n{{}}"
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut answer))
            .await
            .expect("the gateway answers without waiting for the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]);
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "{method} {path}: {answer}"
        );
        assert!(answer.contains("payload_too_large"), "{answer}");
    }
    // Nothing was onboarded by the refused PUT.
    let (status, _) = gateway
        .call(
            reqwest::Method::GET,
            "/v1/product-analytics/projects/2".to_owned(),
            &token,
            &instance,
        )
        .await;
    assert_eq!(status, 404);
}
