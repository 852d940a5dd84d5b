//! The project lifecycle against the real ClickHouse: idempotence, concurrency, deprovisioning
//! with a grace period, the purge, quotas, usage, idle tenants and crash recovery.

mod common;

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
    let response = gateway
        .http
        .post(format!("{}/reconcile", gateway.admin_url))
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
    let (status, body) = gateway
        .call(Method::PUT, project_path(3), &token, &instance)
        .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_onboarding_leaves_nothing_the_next_attempt_cannot_finish() {
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let projects: Vec<u64> = (100..130).collect();

    let gateway = Gateway::start(&[&issuer]).await;
    let pid = gateway.pid();
    let calls = projects.iter().map(|project| {
        try_send(
            &gateway,
            Method::PUT,
            project_path(*project),
            &token,
            &instance,
        )
    });
    let onboarding = join_all(calls);
    let killer = async {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        assert!(killed.unwrap().success());
    };
    // Some calls complete, the rest die with the connection; both are fine here.
    let _ = tokio::join!(onboarding_quietly(onboarding), killer);

    drop(gateway);
    let gateway = Gateway::start(&[&issuer]).await;
    let report = reconcile(&gateway).await;
    let ours: Vec<String> = projects.iter().map(|p| tenant_key(&instance, *p)).collect();
    assert!(
        report["failed"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| !ours.contains(&k.as_str().unwrap().to_owned())),
        "{report}"
    );

    for project in &projects {
        let (status, body) = gateway
            .call(Method::PUT, project_path(*project), &token, &instance)
            .await;
        assert!(matches!(status, 200 | 201), "{project}: {status} {body}");
        assert_eq!(body["status"], "ready");
        assert!(database_exists(body["database"].as_str().unwrap()).await);
    }
    let report = reconcile(&gateway).await;
    let leftovers = |field: &str| {
        report[field]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| {
                let k = k.as_str().unwrap();
                ours.iter().any(|key| k.ends_with(key.as_str()))
            })
            .count()
    };
    assert_eq!(
        (
            leftovers("completed"),
            leftovers("failed"),
            leftovers("unregistered_databases")
        ),
        (0, 0, 0),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_adopts_a_database_only_when_it_is_marked_as_its_own_projects() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let database = |project| format!("gitlab_project_{}", tenant_key(&instance, project));
    let (unmarked, forged, garbled) = (database(1), database(2), database(3));
    // Made by hand: no mark, a mark naming another project, a mark that does not parse.
    let marks = [
        (&unmarked, String::new()),
        (
            &forged,
            format!("monitor-gateway project {instance} 4 1700000000"),
        ),
        (
            &garbled,
            format!("monitor-gateway project {instance} 3 1700000000 extra"),
        ),
    ];
    for (database, mark) in &marks {
        clickhouse(&format!("CREATE DATABASE {database}")).await;
        clickhouse(&format!(
            "CREATE TABLE {database}.snowplow_events (app_id String COMMENT '{mark}') \
             ENGINE = MergeTree ORDER BY app_id"
        ))
        .await;
    }

    let report = reconcile(&gateway).await;
    let listed = |field: &str, name: &str| {
        report[field]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| name.ends_with(k.as_str().unwrap()))
    };
    for database in [&unmarked, &forged, &garbled] {
        assert!(
            listed("unregistered_databases", database),
            "{database}: {report}"
        );
        assert!(!listed("completed", database), "{database}: {report}");
        assert_eq!(
            registry_status(&database["gitlab_project_".len()..]).await,
            ""
        );
    }
    for project in [1, 2, 3, 4] {
        let (status, _) = gateway
            .call(Method::GET, project_path(project), &token, &instance)
            .await;
        assert_eq!(status, 404, "project {project}");
    }
    for database in [&unmarked, &forged, &garbled] {
        clickhouse(&format!("DROP DATABASE {database}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_right_after_answering_finishes_the_onboarding_when_it_starts_again() {
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 140);

    let mut gateway = Gateway::start(&[&issuer]).await;
    let (status, answered) = gateway.onboard(&token, &instance, 140).await;
    assert_eq!((status, answered["status"].as_str()), (201, Some("ready")));
    gateway.kill();
    // The answer came before its registry row, which a lone onboarding keeps queued a while.
    assert_eq!(registry_status(&key).await, "");

    // No second PUT: the restarted gateway adopts the database marked as the project's, as it
    // was answered, and counts it.
    let gateway = Gateway::start(&[&issuer]).await;
    registry_settles(&key, "ready").await;
    let metrics = gateway.metrics().await;
    let onboarded = common::metric(&metrics, "monitor_gateway_projects_onboarded_total", &[]);
    // At least ours: its start-up reconciliation may finish other tests' leftovers too.
    assert!(onboarded >= 1.0, "{metrics}");
    let (status, shown) = gateway
        .call(Method::GET, project_path(140), &token, &instance)
        .await;
    assert_eq!((status, &shown), (200, &answered));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_whose_row_a_crash_took_can_be_deleted_elsewhere_and_stays_deleted() {
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 150);

    // This gateway's tenant for the instance is running and has no record of project 150.
    let survivor = Gateway::start(&[&issuer]).await;
    let (status, _) = survivor
        .call(Method::GET, project_path(150), &token, &instance)
        .await;
    assert_eq!(status, 404);
    // Another gateway onboards it and dies before the project's registry row is written.
    let mut crashed = Gateway::start(&[&issuer]).await;
    let (status, answered) = crashed.onboard(&token, &instance, 150).await;
    assert_eq!(status, 201);
    crashed.kill();
    assert_eq!(registry_status(&key).await, "");

    // The instance deletes it through the survivor, which finds the database marked as the
    // project's; the deletion is what the registry keeps.
    let (status, deleted) = survivor
        .call(Method::DELETE, project_path(150), &token, &instance)
        .await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["status"], "deprovisioned");
    assert_eq!(deleted["created_at"], answered["created_at"]);
    assert_eq!(registry_status(&key).await, "deprovisioned");

    // Neither gateway's reconciliation brings it back.
    let restarted = Gateway::start(&[&issuer]).await;
    for gateway in [&survivor, &restarted] {
        let report = reconcile(gateway).await;
        assert!(!report.to_string().contains(&key), "{report}");
        let (status, shown) = gateway
            .call(Method::GET, project_path(150), &token, &instance)
            .await;
        assert_eq!((status, &shown["status"]), (200, &json!("deprovisioned")));
    }
    assert_eq!(registry_status(&key).await, "deprovisioned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_brought_back_is_answered_once_the_registry_says_so() {
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 160);

    let mut gateway = Gateway::start(&[&issuer]).await;
    assert_eq!(gateway.onboard(&token, &instance, 160).await.0, 201);
    let (status, _) = gateway
        .call(Method::DELETE, project_path(160), &token, &instance)
        .await;
    assert_eq!(status, 200);
    let (status, answered) = gateway.onboard(&token, &instance, 160).await;
    assert_eq!((status, answered["status"].as_str()), (201, Some("ready")));
    // The registry held `deprovisioned`, which a lost row would have left standing (and the
    // purge due): this answer waited for the `ready` row.
    gateway.kill();
    assert_eq!(registry_status(&key).await, "ready");

    let gateway = Gateway::start(&[&issuer]).await;
    let (status, shown) = gateway
        .call(Method::GET, project_path(160), &token, &instance)
        .await;
    assert_eq!((status, &shown), (200, &answered));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_project_is_adopted_even_when_the_quota_has_filled_since() {
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let options = || GatewayOptions::new(&[&issuer]).env("TENANTS__MAX_PROJECTS", 1);

    // This gateway's tenant is running and does not know of project 1 when it is answered
    // elsewhere, so it lets project 2 in as well.
    let survivor = Gateway::start_with(options()).await;
    let (status, _) = survivor
        .call(Method::GET, project_path(1), &token, &instance)
        .await;
    assert_eq!(status, 404);
    let mut crashed = Gateway::start_with(options()).await;
    let (status, answered) = crashed.onboard(&token, &instance, 1).await;
    assert_eq!(status, 201);
    crashed.kill();
    assert_eq!(survivor.onboard(&token, &instance, 2).await.0, 201);

    let report = reconcile(&survivor).await;
    let key = tenant_key(&instance, 1);
    assert!(
        report["completed"]
            .as_array()
            .unwrap()
            .contains(&json!(key)),
        "{report}"
    );
    let (status, shown) = survivor
        .call(Method::GET, project_path(1), &token, &instance)
        .await;
    assert_eq!((status, &shown), (200, &answered));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_registry_row_stops_neither_readiness_nor_adoption() {
    let clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let options = || GatewayOptions::new(&[&issuer]).env("CLICKHOUSE__URL", clickhouse.url());
    let mut gateway = Gateway::start_with(options()).await;
    let (status, answered) = gateway.onboard(&token, &instance, 1).await;
    assert_eq!(status, 201);
    gateway.kill();
    clickhouse
        .query(&format!(
            "INSERT INTO monitor_gateway.projects (instance_id, project_id, tenant_key, status, \
             created_at, updated_at, version, deprovisioned_at) VALUES \
             ('{}', 1, 'not-a-key', 'provisioning', now(), now(), 1, toDateTime(0))",
            new_instance()
        ))
        .await;

    // Starting waits for /readyz, which waits for the start-up pass: the corrupt row is
    // skipped, and the project whose row the kill took is adopted by then.
    let gateway = Gateway::start_with(options()).await;
    let (status, shown) = gateway
        .call(Method::GET, project_path(1), &token, &instance)
        .await;
    assert_eq!((status, &shown), (200, &answered));
    let report = reconcile(&gateway).await;
    assert_eq!(report["failed"], json!([]), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_elsewhere_outranks_an_onboarding_row_still_on_its_way() {
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 180);
    let options = || GatewayOptions::new(&[&issuer]).env("TENANTS__DEPROVISION_GRACE_SECONDS", 0);
    let (first, second) = tokio::join!(
        Gateway::start_with(options()),
        Gateway::start_with(options())
    );

    // The second gateway remembers project 180 as purged.
    assert_eq!(second.onboard(&token, &instance, 180).await.0, 201);
    let (status, _) = second
        .call(Method::DELETE, project_path(180), &token, &instance)
        .await;
    assert_eq!(status, 200);
    let purge = second
        .http
        .post(format!("{}/purge", second.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 200);
    registry_settles(&key, "purged").await;

    // Onboarded again through the first, and deleted through the second while the first's
    // row is still queued: the deletion is what the registry keeps.
    assert_eq!(first.onboard(&token, &instance, 180).await.0, 201);
    let (status, deleted) = second
        .call(Method::DELETE, project_path(180), &token, &instance)
        .await;
    assert_eq!((status, &deleted["status"]), (200, &json!("deprovisioned")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(registry_status(&key).await, "deprovisioned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_gateway_does_not_adopt_a_project_whose_row_is_on_its_way() {
    let issuer = Issuer::start().await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 170);
    let issuers = [&issuer];
    let (first, second) = tokio::join!(Gateway::start(&issuers), Gateway::start(&issuers));

    let (status, _) = first.onboard(&token, &instance, 170).await;
    assert_eq!(status, 201);
    // Reconciled elsewhere while the row is still queued in the first gateway.
    let report = reconcile(&second).await;
    assert!(!report.to_string().contains(&key), "{report}");

    let (status, _) = first
        .call(Method::DELETE, project_path(170), &token, &instance)
        .await;
    assert_eq!(status, 200);
    let (status, shown) = second
        .call(Method::GET, project_path(170), &token, &instance)
        .await;
    assert_eq!((status, &shown["status"]), (200, &json!("deprovisioned")));
}

/// Like `send`, for calls that may die with the gateway.
async fn try_send(
    gateway: &Gateway,
    method: Method,
    path: impl AsRef<str>,
    token: &str,
    instance: &str,
) -> Option<u16> {
    let request = gateway.api(method, path.as_ref(), token, instance);
    request
        .send()
        .await
        .ok()
        .map(|response| response.status().as_u16())
}

async fn onboarding_quietly<F: std::future::Future>(future: F) {
    let _ = tokio::time::timeout(Duration::from_secs(30), future).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_row_lost_with_clickhouse_after_the_answer_is_written_once_it_is_back() {
    let mut clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = GatewayOptions::new(&[&issuer])
        .env("CLICKHOUSE__URL", clickhouse.url())
        .env("CLICKHOUSE__TIMEOUT_SECONDS", 1);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let failures = |metrics: &str| {
        common::metric(
            metrics,
            "monitor_gateway_registry_write_failures_total",
            &[],
        )
    };
    let failed_before = failures(&gateway.metrics().await);

    // A lone onboarding's `ready` row waits a moment for company; ClickHouse dies meanwhile.
    let (status, answered) = gateway.onboard(&token, &instance, 1).await;
    assert_eq!((status, answered["status"].as_str()), (201, Some("ready")));
    clickhouse.kill();
    let failed = || async { failures(&gateway.metrics().await) > failed_before };
    common::eventually(
        Duration::from_secs(5),
        "the ready row's INSERT failed",
        failed,
    )
    .await;

    // The answer stands while the registry is away; once it is back the row is written.
    let (status, shown) = gateway
        .call(Method::GET, project_path(1), &token, &instance)
        .await;
    assert_eq!((status, &shown), (200, &answered));
    clickhouse.resume().await;
    let key = answered["tenant_key"].as_str().unwrap();
    let written = || async { clickhouse.registry_status(key).await == "ready" };
    common::eventually(
        Duration::from_secs(20),
        "the ready row written again",
        written,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_lost_during_onboarding_answers_503_and_the_next_attempt_finishes() {
    let mut clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = GatewayOptions::new(&[&issuer])
        .env("CLICKHOUSE__URL", clickhouse.url())
        .env("CLICKHOUSE__TIMEOUT_SECONDS", 3);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    assert_eq!(gateway.onboard(&token, &instance, 1).await.0, 201);

    let projects: Vec<u64> = (2..12).collect();
    let calls = projects
        .iter()
        .map(|project| gateway.call(Method::PUT, project_path(*project), &token, &instance));
    let onboarding = join_all(calls);
    let crash = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        clickhouse.kill();
    };
    let (answers, ()) = tokio::join!(onboarding, crash);
    for (status, body) in &answers {
        assert!(matches!(status, 201 | 503), "{status} {body}");
        if *status == 503 {
            assert_eq!(body["error"]["code"], "upstream_unavailable");
            assert!(
                !body.to_string().contains("127.0.0.1"),
                "internal details leak: {body}"
            );
        }
    }

    // While it is down: clean refusals and an unready gateway, never a hang.
    let (status, body) = gateway
        .call(Method::PUT, project_path(99), &token, &instance)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("upstream_unavailable"))
    );
    assert_eq!(gateway.readyz().await.0, 503);

    clickhouse.resume().await;
    gateway.wait_ready(Duration::from_secs(30)).await;
    for project in &projects {
        let (status, body) = gateway
            .call(Method::PUT, project_path(*project), &token, &instance)
            .await;
        assert!(matches!(status, 200 | 201), "{project}: {status} {body}");
        assert_eq!(body["status"], "ready");
        let tables = clickhouse
            .query(&format!(
                "EXISTS TABLE {}.snowplow_events",
                body["database"].as_str().unwrap()
            ))
            .await;
        assert_eq!(tables.trim(), "1");
    }
    let statuses = format!(
        "SELECT status, count() FROM monitor_gateway.projects FINAL \
         WHERE instance_id = '{instance}' GROUP BY status FORMAT TSV"
    );
    common::eventually(Duration::from_secs(5), "all 11 projects ready", || async {
        clickhouse.query(&statuses).await.trim() == "ready\t11"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_whose_write_timed_out_never_lets_the_purge_take_a_project_onboarded_again() {
    let clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = GatewayOptions::new(&[&issuer])
        .env("CLICKHOUSE__URL", clickhouse.url())
        .env("CLICKHOUSE__TIMEOUT_SECONDS", 1)
        .env("TENANTS__DEPROVISION_GRACE_SECONDS", 1)
        .env("TENANTS__PURGE_INTERVAL_SECONDS", 1)
        .env("TENANTS__IDLE_TIMEOUT_SECONDS", 1);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (status, details) = gateway.onboard(&token, &instance, 1).await;
    assert_eq!(status, 201);
    let database = details["database"].as_str().unwrap().to_owned();

    // ClickHouse hangs: the DELETE times out, but its INSERT is buffered and lands later.
    clickhouse.freeze(true);
    let (status, _) = gateway
        .call(Method::DELETE, project_path(1), &token, &instance)
        .await;
    assert_eq!(status, 503);
    clickhouse.freeze(false);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The instance still wants the project: onboarding settles the registry.
    let (status, body) = gateway
        .call(Method::PUT, project_path(1), &token, &instance)
        .await;
    assert!(matches!(status, 200 | 201), "{status} {body}");
    assert_eq!(body["status"], "ready");

    // Past grace period, purge interval and idle timeout, the project and its data remain.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, shown) = gateway
        .call(Method::GET, project_path(1), &token, &instance)
        .await;
    assert_eq!(
        (status, shown["status"].as_str()),
        (200, Some("ready")),
        "{shown}"
    );
    let exists = clickhouse
        .query(&format!("EXISTS TABLE {database}.snowplow_events"))
        .await;
    assert_eq!(exists.trim(), "1");
    let key = details["tenant_key"].as_str().unwrap();
    assert_eq!(clickhouse.registry_status(key).await, "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_whose_write_was_lost_is_written_again_when_repeated() {
    let mut clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = GatewayOptions::new(&[&issuer])
        .env("CLICKHOUSE__URL", clickhouse.url())
        .env("CLICKHOUSE__TIMEOUT_SECONDS", 1)
        .env("TENANTS__IDLE_TIMEOUT_SECONDS", 1);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (_, details) = gateway.onboard(&token, &instance, 1).await;

    // The DELETE times out and ClickHouse dies before committing it: the write is lost.
    clickhouse.freeze(true);
    let (status, _) = gateway
        .call(Method::DELETE, project_path(1), &token, &instance)
        .await;
    assert_eq!(status, 503);
    clickhouse.kill();
    clickhouse.resume().await;

    // Repeating the DELETE must write it, even though the gateway already holds it as done.
    let (status, body) = gateway
        .call(Method::DELETE, project_path(1), &token, &instance)
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("deprovisioned")),
        "{body}"
    );
    let key = details["tenant_key"].as_str().unwrap();
    assert_eq!(clickhouse.registry_status(key).await, "deprovisioned");

    // After the tenant reloads from the registry, the project is still deprovisioned.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, shown) = gateway
        .call(Method::GET, project_path(1), &token, &instance)
        .await;
    assert_eq!(
        (status, shown["status"].as_str()),
        (200, Some("deprovisioned")),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_never_brings_back_a_project_deleted_meanwhile() {
    // A registry of its own: another test's gateway reconciling the shared one would finish
    // these rows too, and two gateways' caches racing is not what this checks.
    let clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = GatewayOptions::new(&[&issuer]).env("CLICKHOUSE__URL", clickhouse.url());
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let projects: Vec<u64> = (1..=60).collect();
    // Onboardings a crash left half-done, as the registry holds them.
    let rows: Vec<String> = projects
        .iter()
        .map(|p| {
            format!(
                "('{instance}', {p}, '{}', 'provisioning', now(), now(), 1, toDateTime(0))",
                tenant_key(&instance, *p)
            )
        })
        .collect();
    clickhouse
        .query(&format!(
            "INSERT INTO monitor_gateway.projects VALUES {}",
            rows.join(", ")
        ))
        .await;

    // The instance deletes them all while reconciliation works through them.
    let reconciling = async {
        reconcile(&gateway).await;
    };
    let deletes = projects
        .iter()
        .rev()
        .map(|project| gateway.call(Method::DELETE, project_path(*project), &token, &instance));
    let ((), answers) = tokio::join!(reconciling, join_all(deletes));
    for (status, body) in answers {
        assert_eq!(
            (status, &body["status"]),
            (200, &json!("deprovisioned")),
            "{body}"
        );
    }

    for project in &projects {
        let (status, shown) = gateway
            .call(Method::GET, project_path(*project), &token, &instance)
            .await;
        assert_eq!(
            (status, shown["status"].as_str()),
            (200, Some("deprovisioned")),
            "{project}: {shown}"
        );
        let key = tenant_key(&instance, *project);
        assert_eq!(
            clickhouse.registry_status(&key).await,
            "deprovisioned",
            "{project}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_finishes_a_provisioning_row_its_running_tenant_has_not_seen() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    // The instance's tenant is running, with its projects loaded.
    gateway.onboard(&token, &instance, 1).await;
    // Another gateway over the same registry started onboarding project 2 and stopped, after
    // a history of its own: its row's version is above what a fresh record would start at.
    let key = tenant_key(&instance, 2);
    clickhouse(&format!(
        "INSERT INTO monitor_gateway.projects VALUES \
         ('{instance}', 2, '{key}', 'provisioning', now(), now(), 5, toDateTime(0))"
    ))
    .await;

    let report = reconcile(&gateway).await;
    assert!(
        report["completed"]
            .as_array()
            .unwrap()
            .contains(&json!(key)),
        "{report}"
    );
    registry_settles(&key, "ready").await;
    let (status, shown) = gateway
        .call(Method::GET, project_path(2), &token, &instance)
        .await;
    assert_eq!(
        (status, shown["status"].as_str()),
        (200, Some("ready")),
        "{shown}"
    );
    assert!(database_exists(shown["database"].as_str().unwrap()).await);
}
