//! Reconciliation: finishing half-done onboardings and adopting databases whose registry row a
//! crash took, without ever bringing back what was deleted or trusting a stranger's mark.

use std::time::Duration;

use futures::future::join_all;
use reqwest::Method;
use serde_json::json;

use super::{database_exists, project_path, purge, reconcile};
use crate::common::{
    self, Gateway, GatewayOptions, Issuer, clickhouse, new_instance, registry_settles,
    registry_status, tenant_key,
};

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
    let options = || clickhouse.gateway(&issuer);
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
    purge(&second).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_never_brings_back_a_project_deleted_meanwhile() {
    // A registry of its own: another test's gateway reconciling the shared one would finish
    // these rows too, and two gateways' caches racing is not what this checks.
    let clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = clickhouse.gateway(&issuer);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_row_lost_under_a_running_tenant_is_written_again() {
    // A registry of its own: any other gateway's reconciliation would adopt the database.
    let clickhouse = common::PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let options = clickhouse.gateway(&issuer);
    let gateway = Gateway::start_with(options).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (status, answered) = gateway.onboard(&token, &instance, 9).await;
    assert_eq!(status, 201);
    let key = tenant_key(&instance, 9);

    // The row goes (an operator's mistake) while the tenant remembers it.
    clickhouse.lose_registry_rows(&key).await;

    let report = reconcile(&gateway).await;
    assert!(
        report["completed"]
            .as_array()
            .unwrap()
            .contains(&json!(key)),
        "{report}"
    );
    clickhouse.registry_settles(&key, "ready").await;
    let (status, shown) = gateway
        .call(Method::GET, project_path(9), &token, &instance)
        .await;
    assert_eq!((status, shown), (200, answered));
}
