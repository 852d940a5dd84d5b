//! A Cube server of one test's own, started by `scripts/stack.sh cube-serve` as the profiles'
//! Cube is, against the test stack's ClickHouse, that the test may stop and start again.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TEST_JWKS_URL, stack};

/// How long Cube may take to answer `/livez` on these shared, busy machines.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct PrivateCube {
    config_dir: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    log_level: &'static str,
    server: Option<Child>,
}

impl PrivateCube {
    /// Cube with the shipped configuration and data model (`config/cube`).
    pub async fn start() -> Self {
        Self::start_from(&repo().join("config/cube"), "warn").await
    }

    /// Cube with `cube.js` and `model/` of a folder of the tests', logging at `log_level`.
    pub async fn start_from(config_dir: &Path, log_level: &'static str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cube = Self {
            config_dir: config_dir.to_owned(),
            dir: tempfile::tempdir().unwrap(),
            port,
            log_level,
            server: None,
        };
        cube.resume().await;
        cube
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Everything Cube has printed, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("cube.log")
    }

    /// Starts Cube on its port and waits until it answers.
    pub async fn resume(&mut self) {
        let clickhouse = reqwest::Url::parse(&stack().clickhouse_url).unwrap();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let server = Command::new(repo().join("scripts/stack.sh"))
            .arg("cube-serve")
            .arg(&self.config_dir)
            .arg(self.port.to_string())
            .arg(clickhouse.port_or_known_default().unwrap().to_string())
            .arg(TEST_JWKS_URL)
            .env("CUBE_LOG_LEVEL", self.log_level)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("scripts/stack.sh runs");
        self.server = Some(server);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let live = reqwest::get(format!("{}/livez", self.url())).await;
            if live.is_ok_and(|response| response.status().is_success()) {
                return;
            }
            let exited = self.server.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "the private Cube did not start ({exited:?}):\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills Cube outright, as a crash or a lost host would.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Drop for PrivateCube {
    fn drop(&mut self) {
        self.kill();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
