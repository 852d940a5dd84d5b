//! The Cube data model against a known data set: every member GitLab's dashboards use returns
//! what the test computes from the inserted rows itself.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Gateway, Issuer, insert_events, new_instance};
use serde_json::{Value, json};

/// One inserted event, kept to compute the expected answers here.
struct Row {
    minute: u32,
    user: &'static str,
    session: &'static str,
    session_index: u32,
    event: &'static str,
    event_name: &'static str,
    unstruct: &'static str,
    path: &'static str,
    title: &'static str,
    user_id: &'static str,
    language: &'static str,
    os: &'static str,
}

const LINK_CLICK: &str =
    r#"{"schema":"iglu:com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-1"}"#;

fn rows() -> Vec<Row> {
    let row =
        |minute, user, session, session_index, event, event_name, unstruct, path, title| Row {
            minute,
            user,
            session,
            session_index,
            event,
            event_name,
            unstruct,
            path,
            title,
            user_id: if user == "u1" { "alice" } else { "" },
            language: if user == "u2" { "de-DE" } else { "en-US" },
            os: if user == "u3" { "Windows" } else { "Linux" },
        };
    vec![
        row(600, "u1", "s1", 1, "page_view", "page_view", "", "/a", "A"),
        row(610, "u1", "s1", 1, "page_view", "page_view", "", "/b", "B"),
        row(
            620,
            "u1",
            "s1",
            1,
            "unstruct",
            "link_click",
            LINK_CLICK,
            "/b",
            "B",
        ),
        row(720, "u1", "s2", 2, "page_view", "page_view", "", "/a", "A"),
        row(750, "u1", "s2", 2, "struct", "click", "", "/a", "A"),
        row(660, "u2", "s3", 1, "page_view", "page_view", "", "/a", "A"),
        row(780, "u3", "s4", 1, "unstruct", "", LINK_CLICK, "/c", "C"),
        row(785, "u3", "s4", 1, "page_view", "page_view", "", "/c", "C"),
    ]
}

fn stamp(minute: u32) -> String {
    format!("2026-11-02 {:02}:{:02}:00", minute / 60, minute % 60)
}

fn as_event(row: &Row) -> Value {
    json!({
        "app_id": "model-test",
        "event_id": uuid::Uuid::new_v4().to_string(),
        "collector_tstamp": stamp(row.minute),
        "derived_tstamp": stamp(row.minute),
        "domain_userid": row.user,
        "domain_sessionid": row.session,
        "domain_sessionidx": row.session_index,
        "event": row.event,
        "event_name": row.event_name,
        "unstruct_event": row.unstruct,
        "page_urlpath": row.path,
        "page_title": row.title,
        "user_id": row.user_id,
        "br_lang": row.language,
        "os_name": row.os,
    })
}

fn number(value: &Value) -> f64 {
    value
        .as_str()
        .map_or_else(|| value.as_f64().unwrap(), |text| text.parse().unwrap())
}

struct Project<'a> {
    gateway: &'a Gateway,
    token: String,
    instance: String,
}

impl Project<'_> {
    async fn rows(&self, query: Value) -> Vec<Value> {
        let (status, body) = self
            .gateway
            .load(&self.token, &self.instance, 1, query.clone())
            .await;
        assert_eq!(status, 200, "{query}: {body}");
        body["data"]
            .as_array()
            .unwrap_or_else(|| panic!("{query}: {body}"))
            .clone()
    }

    async fn measure(&self, member: &str) -> f64 {
        let rows = self.rows(json!({ "measures": [member] })).await;
        number(&rows[0][member])
    }

    /// `TrackedEvents.count` by one dimension, as a map from its values.
    async fn counts_by(&self, dimension: &str) -> BTreeMap<String, f64> {
        let query = json!({ "measures": ["TrackedEvents.count"], "dimensions": [dimension] });
        let rows = self.rows(query).await;
        rows.iter()
            .map(|row| {
                (
                    row[dimension].as_str().unwrap().to_owned(),
                    number(&row["TrackedEvents.count"]),
                )
            })
            .collect()
    }
}

fn expected_counts(rows: &[Row], key: impl Fn(&Row) -> &str) -> BTreeMap<String, f64> {
    let mut counts = BTreeMap::new();
    for row in rows {
        *counts.entry(key(row).to_owned()).or_insert(0.0) += 1.0;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_member_matches_the_inserted_events() {
    let issuer = Issuer::start().await;
    let gateway = Gateway::start(&[&issuer]).await;
    let instance = new_instance();
    let token = issuer.token(&instance);
    let (_, details) = gateway.onboard(&token, &instance, 1).await;
    let rows = rows();
    insert_events(
        details["database"].as_str().unwrap(),
        &rows.iter().map(as_event).collect::<Vec<_>>(),
    )
    .await;
    let project = Project {
        gateway: &gateway,
        token,
        instance,
    };

    // TrackedEvents measures.
    let users: BTreeSet<&str> = rows.iter().map(|r| r.user).collect();
    let page_views = rows.iter().filter(|r| r.event == "page_view").count();
    let link_clicks = rows
        .iter()
        .filter(|r| r.event == "unstruct" && r.unstruct.contains("/link_click/"))
        .count();
    assert_eq!(
        project.measure("TrackedEvents.count").await,
        rows.len() as f64
    );
    assert_eq!(
        project.measure("TrackedEvents.pageViewsCount").await,
        page_views as f64
    );
    assert_eq!(
        project.measure("TrackedEvents.uniqueUsersCount").await,
        users.len() as f64
    );
    assert_eq!(
        project.measure("TrackedEvents.linkClicksCount").await,
        link_clicks as f64
    );

    // TrackedEvents dimensions.
    assert_eq!(
        project.counts_by("TrackedEvents.pageUrlpath").await,
        expected_counts(&rows, |r| r.path)
    );
    assert_eq!(
        project.counts_by("TrackedEvents.pageTitle").await,
        expected_counts(&rows, |r| r.title)
    );
    assert_eq!(
        project.counts_by("TrackedEvents.event").await,
        expected_counts(&rows, |r| r.event)
    );
    assert_eq!(
        project.counts_by("TrackedEvents.eventName").await,
        expected_counts(&rows, |r| r.event_name)
    );
    assert_eq!(
        project.counts_by("TrackedEvents.userId").await,
        expected_counts(&rows, |r| r.user_id)
    );
    assert_eq!(
        project.counts_by("TrackedEvents.browserLanguage").await,
        expected_counts(&rows, |r| r.language)
    );
    assert_eq!(
        project.counts_by("TrackedEvents.osName").await,
        expected_counts(&rows, |r| r.os)
    );
    let by_hour = project
        .rows(json!({
            "measures": ["TrackedEvents.count"],
            "timeDimensions": [{ "dimension": "TrackedEvents.derivedTstamp", "granularity": "hour" }],
        }))
        .await;
    let expected_hours = expected_counts(&rows, |r| {
        ["10", "11", "12", "13"][(r.minute / 60 - 10) as usize]
    });
    let hours: BTreeMap<String, f64> = by_hour
        .iter()
        .map(|row| {
            let at = row["TrackedEvents.derivedTstamp.hour"].as_str().unwrap();
            (at[11..13].to_owned(), number(&row["TrackedEvents.count"]))
        })
        .collect();
    assert_eq!(hours, expected_hours);

    // Sessions: first to last event of each domain_sessionid.
    let mut sessions: BTreeMap<&str, (u32, u32, &str)> = BTreeMap::new();
    for row in &rows {
        let entry = sessions
            .entry(row.session)
            .or_insert((row.minute, row.minute, row.user));
        entry.0 = entry.0.min(row.minute);
        entry.1 = entry.1.max(row.minute);
    }
    let durations: Vec<f64> = sessions
        .values()
        .map(|(start, end, _)| f64::from(end - start))
        .collect();
    let average = durations.iter().sum::<f64>() / durations.len() as f64;
    let session_users: BTreeSet<&str> = sessions.values().map(|(_, _, user)| *user).collect();
    assert_eq!(
        project.measure("Sessions.count").await,
        sessions.len() as f64
    );
    assert!((project.measure("Sessions.averageDurationMinutes").await - average).abs() < 1e-6);
    let per_user = sessions.len() as f64 / session_users.len() as f64;
    assert!((project.measure("Sessions.averagePerUser").await - per_user).abs() < 1e-6);
    let bounds = project
        .rows(json!({ "dimensions": ["Sessions.sessionId", "Sessions.startAt", "Sessions.endAt"] }))
        .await;
    for row in bounds {
        let (start, end, _) = sessions[row["Sessions.sessionId"].as_str().unwrap()];
        assert!(
            row["Sessions.startAt"]
                .as_str()
                .unwrap()
                .starts_with(&stamp(start).replace(' ', "T")),
            "{row}"
        );
        assert!(
            row["Sessions.endAt"]
                .as_str()
                .unwrap()
                .starts_with(&stamp(end).replace(' ', "T")),
            "{row}"
        );
    }

    // ReturningUsers: users with an event in a session after their first.
    let returning: BTreeSet<&str> = rows
        .iter()
        .filter(|r| r.session_index > 1)
        .map(|r| r.user)
        .collect();
    let percentage = 100.0 * returning.len() as f64 / users.len() as f64;
    assert!(
        (project
            .measure("ReturningUsers.returningUserPercentage")
            .await
            - percentage)
            .abs()
            < 1e-6
    );
}
