//! The command line: configuration layering and validation, and the local developer issuer.

use std::process::Command;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_monitor-gateway"))
}

#[test]
fn check_config_layers_file_and_environment_and_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:1111\"\nadmin_listen = \"127.0.0.1:2222\"\n",
    )
    .unwrap();

    let output = gateway()
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .env("MONITOR_GATEWAY__SERVER__LISTEN", "127.0.0.1:3333")
        .env("MONITOR_GATEWAY__CLICKHOUSE__PASSWORD", "s3cret-value")
        .env(
            "MONITOR_GATEWAY__AUTH__KEY_REFRESH__INTERVAL_SECONDS",
            "600",
        )
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shown = String::from_utf8(output.stdout).unwrap();
    assert!(shown.contains("listen = \"127.0.0.1:3333\""), "{shown}");
    assert!(
        shown.contains("admin_listen = \"127.0.0.1:2222\""),
        "{shown}"
    );
    assert!(shown.contains("interval_seconds = 600"), "{shown}");
    assert!(shown.contains("password = \"<redacted>\""), "{shown}");
    assert!(!shown.contains("s3cret-value"), "{shown}");
}

#[test]
fn invalid_configuration_fails_naming_the_key() {
    let cases = [
        (
            "MONITOR_GATEWAY__SERVER__ADMIN_LISTEN",
            "not-an-address",
            "server.admin_listen",
        ),
        (
            "MONITOR_GATEWAY__AUTH__LEEWAY_SECONDS",
            "minus one",
            "leeway_seconds",
        ),
        ("MONITOR_GATEWAY__CUBE__URL", "ftp://cube", "cube.url"),
        ("MONITOR_GATEWAY__SERVER__NO_SUCH_KEY", "1", "no_such_key"),
    ];
    for (key, value, named) in cases {
        let output = gateway()
            .arg("check-config")
            .env(key, value)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{key}={value} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
        assert!(stderr.contains(named), "{key}={value}: {stderr}");
    }
    // A key of the operator's own file is named as written there, with the file.
    let file = std::env::temp_dir().join(format!("mg-unknown-key-{}.toml", std::process::id()));
    std::fs::write(&file, "[server]\nlisten_addr = \"127.0.0.1:1\"\n").unwrap();
    let output = gateway()
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .output()
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let named = format!("for key \"server.listen_addr\" in {}", file.display());
    assert!(stderr.contains(&named), "{stderr}");

    let output = gateway()
        .args(["--config", "/nonexistent/gw.toml", "check-config"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/gw.toml"));
}

#[test]
fn the_developer_issuer_writes_a_jwks_and_signs_tokens_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = dir.path().join("issuer");
    let status = gateway()
        .args(["dev", "issuer-init", "--dir"])
        .arg(&issuer)
        .status()
        .unwrap();
    assert!(status.success());
    let jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(issuer.join("jwks.json")).unwrap()).unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
    assert_eq!(jwks["keys"][0]["use"], "sig");

    let instance = "8f6e4253-4b5e-4a6c-9d55-3b0b6a1d2c7e";
    let output = gateway()
        .args(["dev", "token", "--instance-id", instance, "--dir"])
        .arg(&issuer)
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    let header = jsonwebtoken::decode_header(token.trim()).unwrap();
    assert_eq!(header.kid.as_deref(), Some(kid.as_str()));

    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwks["keys"][0].clone()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&["gitlab-monitor-gateway"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], instance);
    assert_eq!(claims["scopes"], serde_json::json!(["product_analytics"]));
}
