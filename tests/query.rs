//! Queries through the gateway to the real Cube, and tenant isolation between instances.

mod common;

use common::{Gateway, Issuer, Scene, event, insert_events, member, new_instance, tenant_key};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_counts_exactly_the_projects_events_and_filters_by_event() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (status, details) = gateway.onboard(&token, &instance, 1001).await;
    assert_eq!(status, 201, "{details}");

    let mut events = Vec::new();
    events.extend((0..5).map(|i| event("page_view", &format!("user-{}", i % 3), "/home")));
    events.extend((0..3).map(|_| event("struct", "user-9", "/settings")));
    insert_events(details["database"].as_str().unwrap(), &events).await;

    let (status, body) = gateway
        .load(
            &token,
            &instance,
            1001,
            json!({ "measures": ["TrackedEvents.count"] }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(member(&body, "TrackedEvents.count"), 8, "{body}");

    let filtered = json!({
        "measures": ["TrackedEvents.count"],
        "filters": [{ "member": "TrackedEvents.event", "operator": "equals", "values": ["page_view"] }],
    });
    let (status, body) = gateway.load(&token, &instance, 1001, filtered).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(member(&body, "TrackedEvents.count"), 5, "{body}");

    let views =
        json!({ "measures": ["TrackedEvents.pageViewsCount", "TrackedEvents.uniqueUsersCount"] });
    let (status, body) = gateway.load(&token, &instance, 1001, views).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(member(&body, "TrackedEvents.pageViewsCount"), 5, "{body}");
    assert_eq!(member(&body, "TrackedEvents.uniqueUsersCount"), 4, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_the_same_project_id_see_only_their_own_events() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let (a, b) = (new_instance(), new_instance());
    let (token_a, token_b) = (issuer.token(&a), issuer.token(&b));

    let (_, details_a) = gateway.onboard(&token_a, &a, 77).await;
    let (_, details_b) = gateway.onboard(&token_b, &b, 77).await;
    assert_eq!(
        details_a["database"],
        format!("gitlab_project_{}", tenant_key(&a, 77))
    );
    assert_eq!(
        details_b["database"],
        format!("gitlab_project_{}", tenant_key(&b, 77))
    );
    assert_ne!(details_a["database"], details_b["database"]);

    insert_events(
        details_a["database"].as_str().unwrap(),
        &vec![event("page_view", "u", "/a"); 3],
    )
    .await;
    insert_events(
        details_b["database"].as_str().unwrap(),
        &vec![event("page_view", "u", "/b"); 11],
    )
    .await;

    let query = json!({ "measures": ["TrackedEvents.count"] });
    let (_, body_a) = gateway.load(&token_a, &a, 77, query.clone()).await;
    let (_, body_b) = gateway.load(&token_b, &b, 77, query.clone()).await;
    assert_eq!(member(&body_a, "TrackedEvents.count"), 3, "{body_a}");
    assert_eq!(member(&body_b, "TrackedEvents.count"), 11, "{body_b}");

    // Instance A's token with instance B's header is refused, and A cannot name B's database.
    let (status, body) = gateway.load(&token_a, &b, 77, query.clone()).await;
    assert_eq!(status, 401, "{body}");
    let forged = json!({
        "query": query,
        "securityContext": { "database": details_b["database"] },
        "database": details_b["database"],
    });
    let response = gateway
        .api(
            Method::POST,
            "/v1/product-analytics/projects/77/cubejs-api/v1/load",
            &token_a,
            &a,
        )
        .json(&forged)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(status == 200 || status == 400, "{status} {body}");
    if status == 200 && body["error"] != "Continue wait" {
        assert_eq!(member(&body, "TrackedEvents.count"), 3, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_lists_the_data_model_and_unknown_members_are_invalid_queries() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    gateway.onboard(&token, &instance, 3).await;

    let response = gateway
        .api(
            Method::GET,
            "/v1/product-analytics/projects/3/cubejs-api/v1/meta",
            &token,
            &instance,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let meta: serde_json::Value = response.json().await.unwrap();
    let names: Vec<String> = meta["cubes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|cube| {
            let members = cube["measures"]
                .as_array()
                .unwrap()
                .iter()
                .chain(cube["dimensions"].as_array().unwrap());
            members
                .map(|member| member["name"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    for member in [
        "TrackedEvents.count",
        "TrackedEvents.pageViewsCount",
        "TrackedEvents.uniqueUsersCount",
        "TrackedEvents.derivedTstamp",
        "TrackedEvents.pageUrlpath",
        "TrackedEvents.event",
    ] {
        assert!(
            names.iter().any(|name| name == member),
            "{member} missing from {names:?}"
        );
    }

    let (status, body) = gateway
        .load(
            &token,
            &instance,
            3,
            json!({ "measures": ["TrackedEvents.noSuchMeasure"] }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_query");

    let (status, body) = gateway
        .load(
            &token,
            &instance,
            4,
            json!({ "measures": ["TrackedEvents.count"] }),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "project_not_onboarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_zones_cannot_carry_sql_into_another_tenants_database() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let (a, b) = (new_instance(), new_instance());
    let token_a = issuer.token(&a);
    let (_, details_a) = gateway.onboard(&token_a, &a, 1).await;
    let (_, details_b) = gateway.onboard(&issuer.token(&b), &b, 1).await;
    let mut secret = event("page_view", "u", "/");
    secret["page_title"] = json!("SECRET_OF_TENANT_B");
    insert_events(details_b["database"].as_str().unwrap(), &[secret]).await;
    insert_events(
        details_a["database"].as_str().unwrap(),
        &[event("page_view", "u", "/")],
    )
    .await;

    let injected = format!(
        "UTC'), 'UTC'), 'UTC') `tracked_events__derived_tstamp_day`, toString((SELECT \
         groupArray(page_title) FROM {}.snowplow_events)) `tracked_events__count` -- ",
        details_b["database"].as_str().unwrap()
    );
    let query = |timezone: &str| {
        json!({
            "measures": ["TrackedEvents.count"],
            "timeDimensions": [{ "dimension": "TrackedEvents.derivedTstamp", "granularity": "day" }],
            "timezone": timezone,
        })
    };

    let (status, body) = gateway.load(&token_a, &a, 1, query(&injected)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_query")),
        "{body}"
    );
    assert!(!body.to_string().contains("SECRET_OF_TENANT_B"));

    let path = "/v1/product-analytics/projects/1/cubejs-api/v1/load";
    let response = gateway
        .api(Method::GET, path, &token_a, &a)
        .query(&[("query", query(&injected).to_string())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(
        !response
            .text()
            .await
            .unwrap()
            .contains("SECRET_OF_TENANT_B")
    );

    // Cube's own parser reads bracket parameters the gateway would not see: refused.
    let bracketed = format!(
        "{path}?query[measures][0]=TrackedEvents.count&query[timezone]=UTC%27&query=%7B%7D"
    );
    let response = gateway
        .api(Method::GET, &bracketed, &token_a, &a)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_query");

    let (status, body) = gateway
        .load(&token_a, &a, 1, query("America/New_York"))
        .await;
    assert_eq!(status, 200, "{body}");

    // Cube's own configuration refuses it too, should anything reach Cube unchecked.
    let token = common::security_context_token(details_a["database"].as_str().unwrap()).await;
    let direct = reqwest::Client::new()
        .post(format!("{}/cubejs-api/v1/load", common::stack().cube_url))
        .header("Authorization", token)
        .json(&json!({ "query": query(&injected) }))
        .send()
        .await
        .unwrap();
    let status = direct.status();
    let text = direct.text().await.unwrap();
    assert!(!text.contains("SECRET_OF_TENANT_B"), "{status} {text}");
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{status} {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cubes_clickhouse_user_can_read_but_not_write_or_reach_out() {
    let as_cube = |sql: &'static str| async move {
        reqwest::Client::new()
            .post(&common::stack().clickhouse_url)
            .header("X-ClickHouse-User", "cube")
            .body(sql)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert!(as_cube("SELECT 1").await.is_success());
    for sql in [
        "SELECT * FROM url('http://127.0.0.1:28090/readyz', TSV, 'a String')",
        "CREATE DATABASE cube_must_not_create",
        "CREATE TABLE default.cube_must_not (a UInt8) ENGINE = Memory",
        "SET readonly = 0",
    ] {
        assert!(
            !as_cube(sql).await.is_success(),
            "the cube user could run: {sql}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_wait_returns_data_instead_of_continue_wait() {
    let Scene {
        gateway,
        instance,
        token,
        ..
    } = Scene::new(9, &vec![event("page_view", "u", "/w"); 6]).await;

    // New queries each time, so neither Cube nor the gateway has them ready.
    for path in ["/w", "/x", "/y"] {
        let query = json!({
            "query": {
                "measures": ["TrackedEvents.count"],
                "filters": [{ "member": "TrackedEvents.pageUrlpath", "operator": "notEquals", "values": [path] }],
            }
        });
        let response = gateway
            .api(
                Method::POST,
                "/v1/product-analytics/projects/9/cubejs-api/v1/load",
                &token,
                &instance,
            )
            .header("Prefer", "wait=20")
            .json(&query)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_ne!(body["error"], "Continue wait", "{body}");
        let expected = if path == "/w" { 0 } else { 6 };
        assert_eq!(member(&body, "TrackedEvents.count"), expected, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cubes_own_client_works_against_a_projects_query_url() {
    let Scene {
        issuer,
        gateway,
        instance,
        token,
        details,
    } = Scene::new(5, &vec![event("page_view", "u", "/"); 7]).await;

    // query_url carries the configured public URL; the client must reach this test's gateway.
    let query_url = details["query_url"]
        .as_str()
        .unwrap()
        .replace("http://gateway.test", &gateway.url);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cube-client/check.js");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .args([&query_url, &token, &instance])
        .output()
        .await
        .expect("node runs (scripts/test.sh installs the client)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["count"], 7, "{answer}");
    let cubes = answer["cubes"].as_array().unwrap();
    for cube in ["TrackedEvents", "Sessions", "ReturningUsers"] {
        assert!(
            cubes.iter().any(|name| name == cube),
            "{cube} missing: {answer}"
        );
    }

    // The same client with another instance's token and header reaches nothing of this one.
    let other = new_instance();
    let output = tokio::process::Command::new("node")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cube-client/check.js"))
        .args([&query_url, &issuer.token(&other), &other])
        .output()
        .await
        .unwrap();
    assert!(
        !output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_fragments_in_members_filters_and_sql_requests_stay_in_the_callers_database() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let (a, b) = (new_instance(), new_instance());
    let token_a = issuer.token(&a);
    let (_, details_a) = gateway.onboard(&token_a, &a, 1).await;
    let (_, details_b) = gateway.onboard(&issuer.token(&b), &b, 1).await;
    let database_b = details_b["database"].as_str().unwrap().to_owned();
    let mut secret = event("page_view", "u", "/");
    secret["page_title"] = json!("SECRET_OF_TENANT_B");
    insert_events(&database_b, &[secret]).await;
    insert_events(
        details_a["database"].as_str().unwrap(),
        &[event("page_view", "u", "/")],
    )
    .await;

    let other_table = format!("{database_b}.snowplow_events");
    let hostile = [
        json!({ "measures": [format!("TrackedEvents.count FROM {other_table} --")] }),
        json!({ "dimensions": [format!("(SELECT page_title FROM {other_table})")] }),
        json!({
            "measures": ["TrackedEvents.count"],
            "filters": [{ "member": "TrackedEvents.pageTitle", "operator": "equals",
                          "values": [format!("x' OR 1=1 UNION ALL SELECT page_title FROM {other_table} --")] }],
        }),
        json!({
            "measures": ["TrackedEvents.count"],
            "segments": [format!("TrackedEvents.x; SELECT * FROM {other_table}")],
        }),
        json!({ "measures": ["TrackedEvents.count"], "order": { "TrackedEvents.count": "desc; DROP TABLE x" } }),
    ];
    for endpoint in ["load", "sql", "dry-run"] {
        for query in &hostile {
            let response = gateway
                .api(
                    Method::POST,
                    &format!("/v1/product-analytics/projects/1/cubejs-api/v1/{endpoint}"),
                    &token_a,
                    &a,
                )
                .json(&json!({ "query": query }))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            assert!(
                !text.contains("SECRET_OF_TENANT_B"),
                "{endpoint} {query}: {text}"
            );
            // Generated SQL may echo a filter value as a bound parameter, never another database.
            if endpoint != "load" {
                assert!(
                    !text.contains(&format!("FROM {other_table}\"")),
                    "{endpoint} {query}: {text}"
                );
            }
            assert!(
                matches!(status, 200 | 400),
                "{endpoint} {query}: {status} {text}"
            );
        }
    }

    // The filter value is data, not SQL: it matches no title, so nothing is counted.
    let (status, body) = gateway.load(&token_a, &a, 1, hostile[2].clone()).await;
    assert_eq!(
        (status, member(&body, "TrackedEvents.count")),
        (200, 0),
        "{body}"
    );
    // The generated SQL of A names A's table only, unqualified, within A's database.
    let response = gateway
        .api(
            Method::POST,
            "/v1/product-analytics/projects/1/cubejs-api/v1/sql",
            &token_a,
            &a,
        )
        .json(&json!({ "query": { "measures": ["TrackedEvents.count"] } }))
        .send()
        .await
        .unwrap();
    let sql = response.text().await.unwrap();
    assert!(
        sql.contains("snowplow_events") && !sql.contains(&database_b),
        "{sql}"
    );
}
