//! A PostgreSQL cluster of a test's own (initdb and pg_ctl on a spare port, data in
//! a temporary directory), so the test can stop the server and start it again
//! without touching the machine's shared one.
//!
//! initdb and pg_ctl refuse to run as root: they run as `postgres` (through
//! `runuser` when the test runs as root), and the directory belongs to `postgres`.
//! The cluster is stopped and its directory removed when the value is dropped.

use std::path::PathBuf;
use std::process::Command;

use super::children::free_port;
use super::random_id;

/// Where the PostgreSQL server binaries are (`PG_BIN` overrides).
fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| dir.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .expect("a PostgreSQL server under /usr/lib/postgresql (or PG_BIN)")
}

/// A running (or stopped) cluster of one test.
#[derive(Debug)]
pub struct PgCluster {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

/// A PostgreSQL tool, run as the `postgres` user.
fn postgres_command(tool: &str) -> Command {
    let program = pg_bin().join(tool);
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&program);
        c
    } else {
        Command::new(&program)
    }
}

/// Runs a PostgreSQL tool as the `postgres` user; panics with its output on failure.
fn as_postgres(tool: &str, args: &[&str]) {
    let out = postgres_command(tool)
        .args(args)
        .output()
        .expect("PostgreSQL tool runs");
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgCluster {
    /// initdb (trust, user `postgres`) and start on a free port.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("provisioner-pg-{}", random_id(8)));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("chown")
            .args(["postgres:postgres", &dir.display().to_string()])
            .status()
            .expect("chown runs");
        assert!(
            status.success(),
            "the cluster directory belongs to postgres"
        );
        let cluster = Self {
            port: free_port(),
            dir,
        };
        as_postgres(
            "initdb",
            &[
                "-D",
                &cluster.data().display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
        );
        cluster.start_server();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server URL (no database).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.join("server.log").display().to_string(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server like a crash (`-m immediate`: every session is cut without
    /// a goodbye, the next start recovers from the WAL).
    pub fn crash(&self) {
        as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = postgres_command("pg_ctl")
            .args(["-D", &self.data().display().to_string(), "-m", "immediate"])
            .args(["-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
