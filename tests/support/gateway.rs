//! Runs the real `switchyard` binary on a free port with a config written to a temporary
//! folder, for black-box tests. The gateway writes its bound address to a ready file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Gateway {
    child: Option<Child>,
    pub addr: String,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

impl Gateway {
    /// Starts the gateway on `config` (YAML text); `listen` is forced to 127.0.0.1:0.
    pub async fn start(config: &str) -> Gateway {
        Self::start_with(config, &[]).await
    }

    pub async fn start_with(config: &str, extra_args: &[&str]) -> Gateway {
        Self::launch(
            config,
            tempfile::tempdir().expect("tempdir"),
            extra_args,
            &[],
            false,
        )
        .await
    }

    /// Starts the gateway allowed to run on one CPU only (`taskset -c 0`), as in a container
    /// given one core.
    pub async fn start_on_one_core(config: &str) -> Gateway {
        Self::launch(
            config,
            tempfile::tempdir().expect("tempdir"),
            &[],
            &[],
            true,
        )
        .await
    }

    /// Starts with these environment variables set for the process.
    pub async fn start_with_env(config: &str, envs: &[(&str, &str)]) -> Gateway {
        Self::launch(
            config,
            tempfile::tempdir().expect("tempdir"),
            &[],
            envs,
            false,
        )
        .await
    }

    /// Starts in a folder of an earlier gateway (its ledger and files), e.g. for a restart.
    pub async fn start_in(config: &str, dir: tempfile::TempDir) -> Gateway {
        Self::launch(config, dir, &[], &[], false).await
    }

    /// Stops the process and hands over its folder (which would go away with the gateway).
    pub fn take_dir(&mut self) -> tempfile::TempDir {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }

    /// Runs the gateway on `config` with `envs` when it is expected not to start: its exit
    /// status (`None`: still running after 20 s, then killed) and its log.
    pub fn start_expecting_exit(
        config: &str,
        envs: &[(&str, &str)],
    ) -> (Option<ExitStatus>, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut child, log) = Self::spawn(config, &dir, &[], envs, false);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// `switchyard serve` on `config` (written to `dir`), logging to `dir/gateway.log`, with
    /// its address written to `dir/ready`; `one_core`: under `taskset -c 0`.
    fn spawn(
        config: &str,
        dir: &tempfile::TempDir,
        extra_args: &[&str],
        envs: &[(&str, &str)],
        one_core: bool,
    ) -> (Child, PathBuf) {
        let _ = std::fs::remove_file(dir.path().join("ready"));
        let config_path = dir.path().join("routes.yaml");
        std::fs::write(&config_path, config).expect("write config");
        let ready = dir.path().join("ready");
        let log = dir.path().join("gateway.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let bin = env!("CARGO_BIN_EXE_switchyard");
        let mut command = if one_core {
            let mut c = Command::new("taskset");
            c.args(["-c", "0", bin]);
            c
        } else {
            Command::new(bin)
        };
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .args(extra_args)
            .env_remove("SWITCHYARD_CONFIG")
            // The way out to upstreams does not depend on the machine the tests run on (a
            // proxy or CA bundle set for the shell); a test that wants one sets it.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .envs(envs.iter().copied())
            // The default ledger (sqlite://switchyard.db) lands in the test's own folder.
            .current_dir(dir.path())
            .stdout(Stdio::from(log_file.try_clone().expect("clone log")))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn switchyard");
        (child, log)
    }

    async fn launch(
        config: &str,
        dir: tempfile::TempDir,
        extra_args: &[&str],
        envs: &[(&str, &str)],
        one_core: bool,
    ) -> Gateway {
        let (child, log) = Self::spawn(config, &dir, extra_args, envs, one_core);
        let ready = dir.path().join("ready");
        let mut gw = Gateway {
            child: Some(child),
            addr: String::new(),
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(addr) = std::fs::read_to_string(&ready) {
                gw.addr = addr.trim().to_string();
                return gw;
            }
            if let Some(status) = gw.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "switchyard exited with {status} before listening:\n{}",
                    gw.logs()
                );
            }
            if Instant::now() > deadline {
                panic!("switchyard did not start in time:\n{}", gw.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A sample's value on `/metrics`: the line of `name` whose labels include all of
    /// `labels`, or `None` when there is no such line.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.metrics_text().await;
        let prefix = format!("{name}{{");
        text.lines()
            // `name{labels} value`, or `name value` for a family without labels.
            .filter(|l| l.starts_with(&prefix) || l.split(' ').next() == Some(name))
            .find(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse().expect("a sample value"))
    }

    /// `GET /metrics`, the text.
    pub async fn metrics_text(&self) -> String {
        reqwest::Client::new()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics text")
    }

    /// `GET path` with `Authorization: Bearer key`, read as JSON.
    pub async fn get_json(&self, path: &str, key: &str) -> serde_json::Value {
        reqwest::Client::new()
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("a JSON answer")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("routes.yaml")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Waits until `cond` holds for the log text.
    pub async fn wait_log(&self, cond: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond(&self.logs()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

/// Waits out the last seconds of a wall-clock minute, so per-minute counters do not roll
/// over in the middle of a test.
pub async fn not_near_a_minute_boundary() {
    let secs = chrono::Utc::now().timestamp() % 60;
    if secs > 45 {
        tokio::time::sleep(Duration::from_secs((61 - secs) as u64)).await;
    }
}
