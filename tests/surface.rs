//! Cube's REST surface for one project through the gateway: `load` by GET and POST, several
//! queries at once (`queryType=multi`), `dry-run`, `sql` and `meta`, each checked against what
//! the test inserted.

mod common;

use common::{Gateway, Issuer, event, insert_events, new_instance};
use reqwest::Method;
use serde_json::{Value, json};

const PROJECT: u64 = 7001;

/// One Cube call through the gateway, waited out server-side rather than polled.
async fn ask(
    gateway: &Gateway,
    (token, instance): (&str, &str),
    method: Method,
    endpoint: &str,
    query: &[(&str, String)],
    body: Option<Value>,
) -> (u16, Value) {
    let path = format!("/v1/product-analytics/projects/{PROJECT}/cubejs-api/v1/{endpoint}");
    let mut request = gateway
        .api(method, &path, token, instance)
        .header("Prefer", "wait=30")
        .query(query);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A measure of the first row of one result (Cube sends numbers as strings).
fn count(result: &Value, member: &str) -> i64 {
    result["data"][0][member]
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cube_endpoint_answers_for_the_callers_project() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let caller = (token.as_str(), instance.as_str());
    let (status, details) = gateway.onboard(&token, &instance, PROJECT).await;
    assert_eq!(status, 201, "{details}");
    let database = details["database"].as_str().unwrap().to_owned();

    let views = 4;
    let structured = 3;
    let mut events: Vec<Value> = (0..views)
        .map(|i| event("page_view", &format!("user-{i}"), "/home"))
        .collect();
    events.extend((0..structured).map(|_| event("struct", "user-9", "/settings")));
    insert_events(&database, &events).await;

    let all = json!({ "measures": ["TrackedEvents.count"] });
    let only_views = json!({
        "measures": ["TrackedEvents.count"],
        "filters": [{ "member": "TrackedEvents.event", "operator": "equals", "values": ["page_view"] }],
    });

    // load, by GET with the query in the URL and by POST with it in the body.
    let (status, body) = ask(
        &gateway,
        caller,
        Method::GET,
        "load",
        &[("query", all.to_string())],
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        count(&body, "TrackedEvents.count"),
        views + structured,
        "{body}"
    );
    let (status, body) = ask(
        &gateway,
        caller,
        Method::POST,
        "load",
        &[],
        Some(json!({ "query": only_views })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&body, "TrackedEvents.count"), views, "{body}");

    // Several queries in one call (Cube's data blending, which wants the same granularity).
    let by_day = |mut query: Value| {
        query["timeDimensions"] =
            json!([{ "dimension": "TrackedEvents.derivedTstamp", "granularity": "day" }]);
        query
    };
    let both = json!([by_day(all.clone()), by_day(only_views.clone())]).to_string();
    let (status, body) = ask(
        &gateway,
        caller,
        Method::GET,
        "load",
        &[("query", both), ("queryType", "multi".into())],
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("one result per query");
    let counts: Vec<i64> = results
        .iter()
        .map(|result| count(result, "TrackedEvents.count"))
        .collect();
    assert_eq!(counts, [views + structured, views], "{body}");

    // dry-run normalises without running; sql shows the SQL Cube would run, which names no
    // database: the connection Cube picks from the security context is the project's own.
    let (status, body) = ask(
        &gateway,
        caller,
        Method::POST,
        "dry-run",
        &[],
        Some(json!({ "query": only_views })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["normalizedQueries"][0]["measures"],
        json!(["TrackedEvents.count"]),
        "{body}"
    );
    let (status, body) = ask(
        &gateway,
        caller,
        Method::GET,
        "sql",
        &[("query", only_views.to_string())],
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sql = body["sql"]["sql"][0].as_str().expect("the SQL text");
    assert!(sql.contains("snowplow_events AS"), "{sql}");
    assert!(!sql.contains("gitlab_project_"), "{sql}");
    assert_eq!(body["sql"]["sql"][1], json!(["page_view"]), "{body}");

    // meta lists the data model's cubes.
    let (status, body) = ask(&gateway, caller, Method::GET, "meta", &[], None).await;
    assert_eq!(status, 200, "{body}");
    let mut cubes: Vec<&str> = body["cubes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|cube| cube["name"].as_str())
        .collect();
    cubes.sort_unstable();
    assert_eq!(cubes, ["ReturningUsers", "Sessions", "TrackedEvents"]);

    // Nothing else of Cube's API is reachable.
    for endpoint in [
        "subscribe",
        "pre-aggregations/jobs",
        "run-scheduled-refresh",
    ] {
        let (status, body) = ask(&gateway, caller, Method::GET, endpoint, &[], None).await;
        assert_eq!(status, 404, "{endpoint}: {body}");
    }
}
