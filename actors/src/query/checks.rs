//! What a Cube request may ask before it is forwarded.

use super::{CubeEndpoint, QueryError};

/// Checks what a `load`, `sql` or `dry-run` request asks before it goes to Cube. Cube 0.33
/// pastes a query's `timezone` into SQL unescaped, so only plain zone names may pass; the Cube
/// configuration checks the same again. For GET, it returns the query string to forward, built
/// from the checked values alone, so Cube never parses anything the gateway did not check.
pub fn check_request(
    endpoint: CubeEndpoint,
    post: bool,
    body: &[u8],
    query_string: Option<&str>,
) -> Result<Option<String>, QueryError> {
    let invalid = |what: &str| QueryError::InvalidQuery(what.to_owned());
    if endpoint == CubeEndpoint::Meta {
        return Ok(None);
    }
    if post {
        let body: serde_json::Value =
            serde_json::from_slice(body).map_err(|_| invalid("the request body is not JSON"))?;
        let query = body
            .get("query")
            .cloned()
            .ok_or_else(|| invalid("a query is required"))?;
        check_timezones(&parse_query(query)?)?;
        return Ok(None);
    }

    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query_string.unwrap_or(""))
        .map_err(|_| invalid("the query string is malformed"))?;
    let (mut query, mut query_type) = (None, None);
    for (name, value) in pairs {
        let slot = match name.as_str() {
            "query" => &mut query,
            "queryType" => &mut query_type,
            _ => {
                return Err(invalid(
                    "only the query and queryType parameters are accepted",
                ));
            }
        };
        if slot.replace(value).is_some() {
            return Err(invalid("each parameter may be given once"));
        }
    }
    let query = parse_query(serde_json::Value::String(
        query.ok_or_else(|| invalid("a query is required"))?,
    ))?;
    check_timezones(&query)?;
    if query_type.as_deref().is_some_and(|kind| kind != "multi") {
        return Err(invalid("queryType may only be multi"));
    }

    let mut forwarded = vec![("query", query.to_string())];
    forwarded.extend(query_type.map(|kind| ("queryType", kind)));
    let encoded =
        serde_urlencoded::to_string(forwarded).map_err(|_| invalid("unencodable query"))?;
    Ok(Some(encoded))
}

/// Cube accepts the query as JSON or as a string holding JSON.
fn parse_query(query: serde_json::Value) -> Result<serde_json::Value, QueryError> {
    match query {
        serde_json::Value::String(text) => serde_json::from_str(&text)
            .map_err(|_| QueryError::InvalidQuery("the query is not valid JSON".to_owned())),
        other => Ok(other),
    }
}

fn check_timezones(query: &serde_json::Value) -> Result<(), QueryError> {
    match query {
        serde_json::Value::Array(queries) => queries.iter().try_for_each(check_timezones),
        serde_json::Value::Object(fields) => match fields.get("timezone") {
            None => Ok(()),
            Some(serde_json::Value::String(zone)) if is_zone_name(zone) => Ok(()),
            Some(_) => Err(QueryError::InvalidQuery(
                "timezone must be an IANA time zone name such as \"UTC\" or \"Europe/Berlin\""
                    .to_owned(),
            )),
        },
        _ => Err(QueryError::InvalidQuery(
            "the query must be a JSON object".to_owned(),
        )),
    }
}

/// `Area/Location` shapes: letters first, then letters, digits, `_`, `+`, `-` and `/`.
fn is_zone_name(zone: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '/');
    (1..=64).contains(&zone.len())
        && zone.starts_with(|c: char| c.is_ascii_alphabetic())
        && zone.chars().all(allowed)
        && !zone.contains("//")
        && !zone.ends_with('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_time_zone_names_reach_cube() {
        let post = |query: serde_json::Value| {
            let body = serde_json::json!({ "query": query }).to_string();
            check_request(CubeEndpoint::Load, true, body.as_bytes(), None)
        };
        for zone in [
            "UTC",
            "Europe/Berlin",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+5",
        ] {
            assert!(
                post(serde_json::json!({ "timezone": zone })).is_ok(),
                "{zone}"
            );
        }
        for zone in [
            "UTC'), evil",
            "UTC' --",
            "",
            "/etc",
            "a//b",
            "Europe/",
            "1UTC",
            "Europe/Berlin\n",
        ] {
            assert!(
                post(serde_json::json!({ "timezone": zone })).is_err(),
                "{zone:?}"
            );
        }
        assert!(post(serde_json::json!({ "timezone": 5 })).is_err());
        assert!(post(serde_json::json!([{ "timezone": "UTC" }, { "timezone": "x'y" }])).is_err());
        assert!(post(serde_json::json!("{\"timezone\": \"x'y\"}")).is_err());

        let get = |query: &str| check_request(CubeEndpoint::Load, false, b"", Some(query));
        assert!(get("query=%7B%22timezone%22%3A%22UTC%22%7D").is_ok());
        assert!(get("query=%7B%22timezone%22%3A%22UTC%27%22%7D").is_err());
        assert!(get("queryType=multi").is_err());
        assert!(get("query=%7B%7D&query=%7B%7D").is_err(), "duplicate query");
        assert!(
            get("query[timezone]=x&query=%7B%7D").is_err(),
            "bracket parameters"
        );
        assert!(get("query=%7B%7D&j0=1").is_err(), "unknown parameters");
        assert_eq!(
            get("query=%7B%22timezone%22%3A%22UTC%22%7D&queryType=multi")
                .unwrap()
                .as_deref(),
            Some("query=%7B%22timezone%22%3A%22UTC%22%7D&queryType=multi")
        );
        assert!(check_request(CubeEndpoint::Load, true, b"not json", None).is_err());
        assert!(check_request(CubeEndpoint::Meta, false, b"", None).is_ok());
    }
}
