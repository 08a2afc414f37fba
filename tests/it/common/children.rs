//! The real `provisioner` binary as a child process of a test: started with exactly
//! the environment the test gives it, its log in a file the test can show, stopped
//! with the signal the test chooses, and killed when the test ends.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::random_id;

/// The binary under test: cargo's build of this package, or `PROVISIONER_TEST_BIN`
/// when set (a developer whose target directory other checkouts share points it at
/// a copy of their own build, since `target/debug/provisioner` is whichever checkout
/// linked it last).
fn binary() -> String {
    std::env::var("PROVISIONER_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_provisioner").to_owned())
}

/// A free TCP port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One running `provisioner` process.
#[derive(Debug)]
pub struct Process {
    /// What it was started as, for messages (`serve`, `worker 2`).
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `provisioner ARGS` with exactly `env` (and `PATH`), stderr and stdout
    /// to a log file.
    pub fn start(name: &str, args: &[&str], env: &[(String, String)]) -> Self {
        Self::spawn(name, args, env, true)
    }

    /// Same, with only stderr (the service's log) in the log file: a command's
    /// output on stdout stays out of it.
    pub fn start_stderr_only(name: &str, args: &[&str], env: &[(String, String)]) -> Self {
        Self::spawn(name, args, env, false)
    }

    fn spawn(name: &str, args: &[&str], env: &[(String, String)], stdout: bool) -> Self {
        let file_name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let log =
            std::env::temp_dir().join(format!("provisioner-{file_name}-{}.log", random_id(8)));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(binary());
        let out = match stdout {
            true => Stdio::from(file.try_clone().unwrap()),
            false => Stdio::null(),
        };
        cmd.args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(file);
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self {
            name: name.to_owned(),
            child: cmd.spawn().expect("the binary starts"),
            log,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of its log, for a failure message.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Its exit status, if it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Panics (with its log) if the process has exited: it was expected to live on
    /// by itself.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited by itself ({status}); its log:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// Its exit status, if it has exited (without panicking, unlike
    /// [`Process::assert_running`]).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits until `GET {base}/healthz` answers 200 (60 s at most).
    pub async fn wait_healthy(&mut self, base: &str) {
        self.wait_ok(&format!("{base}/healthz")).await;
    }

    /// Waits until `GET url` answers 200 (60 s at most), while the process runs.
    pub async fn wait_ok(&mut self, url: &str) {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            self.assert_running();
            if let Ok(res) = client.get(url).send().await
                && res.status() == 200
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never answered {url} with 200: {}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and reaps it.
    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL sent");
        self.child.wait().expect("reaped");
    }

    /// SIGTERM (the process decides when to exit).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM sent to {}", self.name);
    }

    /// Waits for the process to exit, up to `limit`; panics otherwise.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within {limit:?}: {}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!(
                "--- {} (log kept at {}):\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
    }
}
