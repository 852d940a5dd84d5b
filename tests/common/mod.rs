//! Shared harness of the black-box tests: the real ClickHouse and Cube that `scripts/test.sh`
//! starts, a local token issuer standing in for CustomersDot, and gateway processes.

#![allow(dead_code)]

pub mod cube;
pub mod issuer;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use issuer::Issuer;

/// The key set of the test profile's gateway (`scripts/gateway.sh up test`), which Cube trusts;
/// every test gateway signs with the same key.
pub const TEST_JWKS_URL: &str = "http://127.0.0.1:28080/.well-known/jwks.json";

/// Where the test stack runs; `scripts/test.sh` exports these, the defaults match its ports.
pub struct Stack {
    pub clickhouse_url: String,
    pub cube_url: String,
    pub signing_key: PathBuf,
}

pub fn stack() -> Stack {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Stack {
        clickhouse_url: std::env::var("MG_TEST_CLICKHOUSE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:28123".into()),
        cube_url: std::env::var("MG_TEST_CUBE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:24000".into()),
        signing_key: std::env::var("MG_TEST_SIGNING_KEY")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join(".stack/test/keys/gateway-signing.pem")),
    }
}

/// The tenant key computed here, independently of the gateway's code.
pub fn tenant_key(instance: &str, project: u64) -> String {
    let digest = Sha256::digest(format!("{}:{project}", instance.to_lowercase()).as_bytes());
    hex::encode(&digest[..16])
}

pub fn new_instance() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A running `monitor-gateway serve`, killed when dropped.
pub struct Gateway {
    child: Child,
    pub url: String,
    pub admin_url: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

pub struct GatewayOptions<'a> {
    pub issuers: Vec<&'a Issuer>,
    /// Configure issuers by their OIDC discovery document instead of their JWKS URL.
    pub discovery: bool,
    /// Extra MONITOR_GATEWAY__* variables.
    pub env: Vec<(String, String)>,
    pub wait_ready: bool,
}

impl<'a> GatewayOptions<'a> {
    pub fn new(issuers: &[&'a Issuer]) -> Self {
        Self {
            issuers: issuers.to_vec(),
            discovery: false,
            env: Vec::new(),
            wait_ready: true,
        }
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env
            .push((format!("MONITOR_GATEWAY__{key}"), value.to_string()));
        self
    }

    pub fn discovery(mut self) -> Self {
        self.discovery = true;
        self
    }

    pub fn unready(mut self) -> Self {
        self.wait_ready = false;
        self
    }
}

impl Gateway {
    pub async fn start(issuers: &[&Issuer]) -> Self {
        Self::start_with(GatewayOptions::new(issuers)).await
    }

    pub async fn start_with(options: GatewayOptions<'_>) -> Self {
        let stack = stack();
        assert!(
            stack.signing_key.exists(),
            "{} is missing: run the tests with scripts/test.sh, which starts ClickHouse, Cube and the key Cube trusts",
            stack.signing_key.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, config_toml(&stack, &options)).unwrap();

        let mut command = Command::new(env!("CARGO_BIN_EXE_monitor-gateway"));
        command
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in &options.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the gateway binary starts");
        let (public, admin) = listener_addresses(&mut child);

        let gateway = Self {
            child,
            url: format!("http://{public}"),
            admin_url: format!("http://{admin}"),
            http: reqwest::Client::new(),
            _dir: dir,
        };
        if options.wait_ready {
            gateway.wait_ready(Duration::from_secs(30)).await;
        }
        gateway
    }

    pub async fn readyz(&self) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}/readyz", self.admin_url))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.readyz().await;
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready after {timeout:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A request to the public API with an instance's credentials.
    pub fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        instance: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token)
            .header("X-Gitlab-Instance-Id", instance)
    }

    /// Any API call with an instance's credentials: the status and the JSON body (or null).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: impl AsRef<str>,
        token: &str,
        instance: &str,
    ) -> (u16, Value) {
        let response = self
            .api(method, path.as_ref(), token, instance)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `TrackedEvents.count` of a project, through the gateway and Cube.
    pub async fn count_events(&self, token: &str, instance: &str, project: u64) -> (u16, i64) {
        let query = json!({ "measures": ["TrackedEvents.count"] });
        let (status, body) = self.load(token, instance, project, query).await;
        (status, member(&body, "TrackedEvents.count"))
    }

    pub async fn onboard(&self, token: &str, instance: &str, project: u64) -> (u16, Value) {
        let path = format!("/v1/product-analytics/projects/{project}");
        let response = self
            .api(reqwest::Method::PUT, &path, token, instance)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// A Cube `load` through the gateway, polling while Cube answers "Continue wait".
    pub async fn load(
        &self,
        token: &str,
        instance: &str,
        project: u64,
        query: Value,
    ) -> (u16, Value) {
        let path = format!("/v1/product-analytics/projects/{project}/cubejs-api/v1/load");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let response = self
                .api(reqwest::Method::POST, &path, token, instance)
                .json(&json!({ "query": query }))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            if status == 200 && body["error"] == "Continue wait" && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            return (status, body);
        }
    }

    pub async fn metrics(&self) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .unwrap();
        response.text().await.unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config_toml(stack: &Stack, options: &GatewayOptions<'_>) -> String {
    let mut toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
public_url = "http://gateway.test"

[log]
format = "json"
level = "info,actors=debug"

[auth.key_refresh]
interval_seconds = 3600
jitter = 0.0
unknown_kid_min_interval_seconds = 1
retry_seconds = 1
fetch_timeout_seconds = 2

[clickhouse]
url = "{ch}"

[cube]
url = "{cube}"

[signing]
key_file = "{key}"
create_if_missing = false
"#,
        ch = stack.clickhouse_url,
        cube = stack.cube_url,
        key = stack.signing_key.display(),
    );
    for (i, issuer) in options.issuers.iter().enumerate() {
        let source = if options.discovery {
            format!("discovery_url = \"{}\"", issuer.discovery_url())
        } else {
            format!("jwks_url = \"{}\"", issuer.jwks_url())
        };
        toml.push_str(&format!(
            "\n[[auth.issuers]]\nname = \"issuer{i}\"\nissuer = \"{}\"\n{source}\n",
            issuer.issuer
        ));
    }
    toml
}

/// Reads the gateway's JSON logs until both listeners are bound; echoes every line to stderr
/// so a failing test shows what the gateway said.
fn listener_addresses(child: &mut Child) -> (String, String) {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("[gateway] {line}");
            if let Ok(log) = serde_json::from_str::<Value>(&line)
                && log["message"] == "listening"
            {
                let _ = tx.send((
                    log["listener"].as_str().unwrap_or_default().to_owned(),
                    log["addr"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    });
    let (mut public, mut admin) = (None, None);
    while public.is_none() || admin.is_none() {
        let (which, addr) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the gateway binds its listeners");
        match which.as_str() {
            "public" => public = Some(addr),
            _ => admin = Some(addr),
        }
    }
    (public.unwrap(), admin.unwrap())
}

/// ClickHouse over HTTP, as the default user.
pub async fn clickhouse(sql: &str) -> String {
    let response = reqwest::Client::new()
        .post(&stack().clickhouse_url)
        .body(sql.to_owned())
        .send()
        .await
        .expect("ClickHouse answers");
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "ClickHouse refused {sql:?}: {text}");
    text
}

/// One tracked event; fields not given are left to the table's defaults.
pub fn event(name: &str, user: &str, path: &str) -> Value {
    json!({
        "app_id": "test",
        "event": name,
        "event_id": uuid::Uuid::new_v4().to_string(),
        "domain_userid": user,
        "page_urlpath": path,
        "collector_tstamp": "2026-11-02 10:00:00",
        "derived_tstamp": "2026-11-02 10:00:00",
    })
}

pub async fn insert_events(database: &str, events: &[Value]) {
    let body: String = events.iter().map(|event| format!("{event}\n")).collect();
    clickhouse(&format!(
        "INSERT INTO {database}.snowplow_events FORMAT JSONEachRow\n{body}"
    ))
    .await;
}

/// A security-context token signed with the key Cube trusts, as the gateway would sign it.
pub async fn security_context_token(database: &str) -> String {
    let jwks: Value = reqwest::get(TEST_JWKS_URL)
        .await
        .expect("the test stack's gateway serves its JWKS")
        .json()
        .await
        .unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
    let pem = std::fs::read(stack().signing_key).unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid);
    let now = issuer::now();
    let claims = json!({
        "iss": "monitor-gateway", "aud": "cube", "iat": now, "exp": now + 60,
        "sub": "test", "database": database,
    });
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// A measure of the first row of a Cube answer (Cube sends numbers as strings); -1 when absent.
pub fn member(body: &Value, name: &str) -> i64 {
    let value = &body["data"][0][name];
    value.as_str().map_or_else(
        || value.as_i64().unwrap_or(-1),
        |text| text.parse().unwrap_or(-1),
    )
}

/// A ClickHouse server of one test's own, configured by `scripts/stack.sh`, that the test may
/// stop and start again on the same data.
pub struct PrivateClickHouse {
    dir: tempfile::TempDir,
    pub http_port: u16,
    server: Option<Child>,
}

impl PrivateClickHouse {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect::<Vec<_>>()
            .iter()
            .map(|listener| listener.local_addr().unwrap().port())
            .collect();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let rendered = Command::new(script)
            .arg("clickhouse-config")
            .arg(dir.path())
            .args(ports.iter().map(u16::to_string))
            .status()
            .unwrap();
        assert!(rendered.success());
        let mut clickhouse = Self {
            dir,
            http_port: ports[0],
            server: None,
        };
        clickhouse.resume().await;
        clickhouse
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Starts the server on its existing data and waits until it answers.
    pub async fn resume(&mut self) {
        let server = Command::new("/usr/sbin/clickhouse-server")
            .arg(format!(
                "--config-file={}",
                self.dir.path().join("config.xml").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("clickhouse-server starts (scripts/stack.sh install puts it there)");
        self.server = Some(server);
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{}/?query=SELECT%201", self.url()))
            .await
            .is_err()
        {
            let exited = self
                .server
                .as_mut()
                .and_then(|s| s.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "the private ClickHouse exited ({exited:?}); was one of its ports taken?"
            );
            assert!(
                Instant::now() < deadline,
                "the private ClickHouse did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: a hung server that still accepts
    /// connections and buffers what it is sent.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.server.as_ref().expect("the server runs").id();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Kills the server outright, as a crash or a lost host would.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &server.id().to_string()])
                .status();
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    pub async fn query(&self, sql: &str) -> String {
        let response = reqwest::Client::new()
            .post(self.url())
            .body(sql.to_owned())
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{sql}");
        response.text().await.unwrap()
    }
}

impl PrivateClickHouse {
    /// Options for a gateway trusting `issuer` whose registry and tenants live here.
    pub fn gateway<'a>(&self, issuer: &'a Issuer) -> GatewayOptions<'a> {
        GatewayOptions::new(&[issuer]).env("CLICKHOUSE__URL", self.url())
    }

    /// The registry's current status of a project, by tenant key.
    pub async fn registry_status(&self, tenant_key: &str) -> String {
        let sql = format!(
            "SELECT status FROM monitor_gateway.projects FINAL WHERE tenant_key = '{tenant_key}'"
        );
        self.query(&sql).await.trim().to_owned()
    }

    /// Removes a project's registry rows once its `ready` row is there, as a lost write would.
    pub async fn lose_registry_rows(&self, tenant_key: &str) {
        self.registry_settles(tenant_key, "ready").await;
        self.query(&format!(
            "ALTER TABLE monitor_gateway.projects DELETE WHERE tenant_key = '{tenant_key}'"
        ))
        .await;
        self.registry_settles(tenant_key, "").await;
    }

    /// Waits for the registry to show `status`, like [`registry_settles`].
    pub async fn registry_settles(&self, tenant_key: &str, status: &str) {
        let what = format!("the registry shows {tenant_key} as {status}");
        eventually(Duration::from_secs(5), &what, || async {
            self.registry_status(tenant_key).await == status
        })
        .await;
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The sum of a Prometheus metric's samples whose labels contain all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A gateway trusting a fresh local issuer, and one instance with a project onboarded and
/// holding the given events: the opening of most query tests.
pub struct Scene {
    pub issuer: Issuer,
    pub gateway: Gateway,
    pub instance: String,
    pub token: String,
    pub details: Value,
}

impl Scene {
    pub async fn new(project: u64, events: &[Value]) -> Self {
        Self::with_env(project, events, &[]).await
    }

    /// The same with extra `MONITOR_GATEWAY__*` variables for the gateway, such as `CUBE__URL`.
    pub async fn with_env(project: u64, events: &[Value], env: &[(&str, String)]) -> Self {
        let issuer = Issuer::start().await;
        let options = env
            .iter()
            .fold(GatewayOptions::new(&[&issuer]), |options, (key, value)| {
                options.env(key, value)
            });
        let gateway = Gateway::start_with(options).await;
        let instance = new_instance();
        let token = issuer.token(&instance);
        let (status, details) = gateway.onboard(&token, &instance, project).await;
        assert_eq!(status, 201, "{details}");
        if !events.is_empty() {
            insert_events(details["database"].as_str().unwrap(), events).await;
        }
        Self {
            issuer,
            gateway,
            instance,
            token,
            details,
        }
    }
}

/// The registry's current status of a project on the test profile's ClickHouse, by tenant key.
pub async fn registry_status(key: &str) -> String {
    clickhouse(&format!(
        "SELECT status FROM monitor_gateway.projects FINAL WHERE tenant_key = '{key}' FORMAT TSV"
    ))
    .await
    .trim()
    .to_owned()
}

/// Waits for the registry to show `status`: an onboarding's `ready` row is written behind its
/// answer.
pub async fn registry_settles(key: &str, status: &str) {
    let what = format!("the registry shows {key} as {status}");
    eventually(Duration::from_secs(5), &what, || async {
        registry_status(key).await == status
    })
    .await;
}

/// Polls `done` until it holds, failing with `what` after `limit`.
pub async fn eventually<F: Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
