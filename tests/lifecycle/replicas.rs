//! Two gateways over one registry, as replicas behind a load balancer: whichever of them answers,
//! the registry ends with the change answered last, a purge never takes a project another
//! brought back, and each learns the other's changes within its refresh interval. Each test has
//! a ClickHouse of its own, whose registry no other test's gateway purges or adopts from.

use std::time::Duration;

use futures::future::join_all;
use reqwest::Method;
use serde_json::json;

use super::{project_path, purge};
use crate::common::{self, Gateway, Issuer, PrivateClickHouse, new_instance, tenant_key};

/// Two gateways over `clickhouse`'s registry, B with `b_env` on top. Neither looks at the
/// registry's changes on its own unless told to: what they get right, they get right by
/// reading the registry when a change asks for it.
async fn replicas(
    issuer: &Issuer,
    clickhouse: &PrivateClickHouse,
    b_env: &[(&str, u64)],
) -> (Gateway, Gateway) {
    let options = || {
        clickhouse
            .gateway(issuer)
            .env("TENANTS__REFRESH_SECONDS", 0)
    };
    let b = b_env
        .iter()
        .fold(options(), |options, (key, value)| options.env(key, value));
    tokio::join!(Gateway::start_with(options()), Gateway::start_with(b))
}

async fn list(gateway: &Gateway, token: &str, instance: &str) -> u16 {
    let path = "/v1/product-analytics/projects";
    gateway.call(Method::GET, path, token, instance).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_onboarding_through_one_replica_outranks_an_older_delete_through_the_other() {
    let clickhouse = PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let (a, b) = replicas(&issuer, &clickhouse, &[]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 1);
    // B's tenant is running and knows no project yet.
    assert_eq!(list(&b, &token, &instance).await, 200);

    assert_eq!(a.onboard(&token, &instance, 1).await.0, 201);
    let (status, _) = a
        .call(Method::DELETE, project_path(1), &token, &instance)
        .await;
    assert_eq!(status, 200);
    clickhouse.registry_settles(&key, "deprovisioned").await;

    // B brings it back: the registry keeps B's change, the later one.
    let (status, restored) = b.onboard(&token, &instance, 1).await;
    assert_eq!(
        (status, &restored["status"]),
        (201, &json!("ready")),
        "{restored}"
    );
    clickhouse.registry_settles(&key, "ready").await;

    // A, which remembers it deleted, finds it ready again rather than reviving its own view.
    let (status, shown) = a.onboard(&token, &instance, 1).await;
    assert_eq!(
        (status, &shown["status"]),
        (200, &json!("ready")),
        "{shown}"
    );
    assert_eq!(shown["created_at"], restored["created_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_through_a_replica_that_remembers_the_project_deleted_takes_effect() {
    let clickhouse = PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let (a, b) = replicas(&issuer, &clickhouse, &[]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 2);

    assert_eq!(b.onboard(&token, &instance, 2).await.0, 201);
    let (status, _) = b
        .call(Method::DELETE, project_path(2), &token, &instance)
        .await;
    assert_eq!(status, 200);
    clickhouse.registry_settles(&key, "deprovisioned").await;
    assert_eq!(a.onboard(&token, &instance, 2).await.0, 201);
    clickhouse.registry_settles(&key, "ready").await;

    // B still remembers it deleted; its DELETE must still delete what A brought back.
    let (status, deleted) = b
        .call(Method::DELETE, project_path(2), &token, &instance)
        .await;
    assert_eq!((status, &deleted["status"]), (200, &json!("deprovisioned")));
    clickhouse.registry_settles(&key, "deprovisioned").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_never_drops_a_project_another_replica_brought_back() {
    let clickhouse = PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let purging = [
        ("TENANTS__DEPROVISION_GRACE_SECONDS", 1),
        ("TENANTS__PURGE_INTERVAL_SECONDS", 3600),
        ("TENANTS__MAX_PROJECTS", 1000),
    ];
    let (a, b) = replicas(&issuer, &clickhouse, &purging).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    // Projects 1 to 150 keep B's purge busy before it reaches project 151, the last in its
    // order, so that A brings 151 back after the purge listed it as due.
    let (project, others) = (151, 1..=150);
    let key = tenant_key(&instance, project);
    let (_, details) = b.onboard(&token, &instance, project).await;
    let database = details["database"].as_str().unwrap().to_owned();
    clickhouse
        .query(&format!(
            "INSERT INTO {database}.snowplow_events (app_id, event_id) VALUES ('{key}', 'e1'), \
             ('{key}', 'e2')"
        ))
        .await;
    let delete = |project| b.call(Method::DELETE, project_path(project), &token, &instance);
    for chunk in others.collect::<Vec<_>>().chunks(10) {
        join_all(chunk.iter().map(|&p| b.onboard(&token, &instance, p))).await;
        join_all(chunk.iter().map(|&p| delete(p))).await;
    }
    assert_eq!(delete(project).await.0, 200);
    clickhouse.registry_settles(&key, "deprovisioned").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // B's purge starts; A brings the project back meanwhile. B still remembers it deleted,
    // and due.
    let (report, restored) = tokio::join!(purge(&b), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.onboard(&token, &instance, project).await
    });
    assert_eq!(restored.0, 201, "{}", restored.1);
    let purged = report["purged"].as_array().unwrap();
    assert!(!purged.contains(&json!(key)), "{report}");
    let count = clickhouse
        .query(&format!("SELECT count() FROM {database}.snowplow_events"))
        .await;
    assert_eq!(count.trim(), "2");
    assert_eq!(clickhouse.registry_status(&key).await, "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_learn_each_others_changes_within_the_refresh_interval() {
    let clickhouse = PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let (a, b) = replicas(&issuer, &clickhouse, &[("TENANTS__REFRESH_SECONDS", 1)]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    assert_eq!(list(&b, &token, &instance).await, 200);

    // Onboarded through A: B's running tenant, which loaded before, learns of it.
    let (status, answered) = a.onboard(&token, &instance, 4).await;
    assert_eq!(status, 201);
    let shown_on_b = || async {
        let (status, shown) = b
            .call(Method::GET, project_path(4), &token, &instance)
            .await;
        status == 200 && shown == answered
    };
    let what = "B never learned of the onboarding";
    common::eventually(Duration::from_secs(10), what, shown_on_b).await;

    // Deleted through A: B stops serving it (queries need it ready, as GET shows it).
    let (status, _) = a
        .call(Method::DELETE, project_path(4), &token, &instance)
        .await;
    assert_eq!(status, 200);
    let deleted_on_b = || async {
        let (status, shown) = b
            .call(Method::GET, project_path(4), &token, &instance)
            .await;
        status == 200 && shown["status"] == json!("deprovisioned")
    };
    let what = "B still shows a deleted project ready";
    common::eventually(Duration::from_secs(10), what, deleted_on_b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_has_not_heard_of_a_project_answers_with_its_details() {
    let clickhouse = PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let (a, b) = replicas(&issuer, &clickhouse, &[]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 5);
    assert_eq!(list(&b, &token, &instance).await, 200);

    // Ready through A: B's PUT finds its database there and answers it as A did.
    let (status, answered) = a.onboard(&token, &instance, 5).await;
    assert_eq!(status, 201);
    clickhouse.registry_settles(&key, "ready").await;
    let (status, shown) = b.onboard(&token, &instance, 5).await;
    assert_eq!(
        (status, &shown["created_at"]),
        (200, &answered["created_at"])
    );

    // Project 7's row lost (as a crash right after A's answer would): B's PUT answers as A
    // did, from the database's mark, and writes the row before it answers.
    let (status, answered) = a.onboard(&token, &instance, 7).await;
    assert_eq!(status, 201);
    let key = tenant_key(&instance, 7);
    clickhouse.lose_registry_rows(&key).await;
    let (status, shown) = b.onboard(&token, &instance, 7).await;
    assert_eq!(
        (status, &shown["created_at"]),
        (200, &answered["created_at"])
    );
    assert_eq!(clickhouse.registry_status(&key).await, "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_through_a_replica_that_has_not_heard_of_the_deletion_waits_for_its_row() {
    let clickhouse = PrivateClickHouse::start().await;
    let issuer = Issuer::start().await;
    let (a, b) = replicas(&issuer, &clickhouse, &[]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let key = tenant_key(&instance, 6);
    assert_eq!(list(&b, &token, &instance).await, 200);

    let (_, answered) = a.onboard(&token, &instance, 6).await;
    let (status, _) = a
        .call(Method::DELETE, project_path(6), &token, &instance)
        .await;
    assert_eq!(status, 200);
    clickhouse.registry_settles(&key, "deprovisioned").await;

    // B brings it back with its data, and the registry says so by the answer: a crash right
    // after it cannot leave the deletion in place, for the purge to act on.
    let (status, restored) = b.onboard(&token, &instance, 6).await;
    assert_eq!((status, &restored["status"]), (201, &json!("ready")));
    assert_eq!(restored["created_at"], answered["created_at"]);
    assert_eq!(clickhouse.registry_status(&key).await, "ready");
}
