//! What operators see: every series the Grafana dashboard plots exists on /metrics once the
//! gateway has served a little traffic.

mod common;

use common::{Gateway, Issuer, new_instance, registry_settles, tenant_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_on_the_dashboard_is_exported() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    gateway.onboard(&token, &instance, 1).await;
    // The onboarding's registry row, written behind the answer, is the first registry INSERT.
    registry_settles(&tenant_key(&instance, 1), "ready").await;
    assert_eq!(gateway.count_events(&token, &instance, 1).await, (200, 0));

    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/grafana/overview.json"
    ))
    .unwrap();
    let mut names: Vec<&str> = dashboard
        .match_indices("monitor_gateway_")
        .map(|(start, _)| {
            let rest = &dashboard[start..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 15, "{names:?}");

    let exported = gateway.metrics().await;
    let missing: Vec<&str> = names
        .into_iter()
        .filter(|name| {
            !exported.lines().any(|line| {
                line.starts_with(&format!("{name} ")) || line.starts_with(&format!("{name}{{"))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "plotted but not exported: {missing:?}\n{exported}"
    );
}

/// Grafana keys a panel's queries by `refId`; two alike make one of them vanish from the panel.
#[test]
fn every_query_of_a_panel_has_its_own_ref_id() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/grafana/overview.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(!panels.is_empty());
    for panel in panels {
        let mut ids: Vec<&str> = panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|target| target["refId"].as_str().unwrap())
            .collect();
        let count = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), count, "panel {}", panel["title"]);
    }
}
