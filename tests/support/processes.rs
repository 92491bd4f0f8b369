//! Real `distbank branch` processes for the durability and fault tests: started with a data
//! directory, killed with SIGKILL (no chance to flush or say goodbye), restarted on the same
//! ports and directory, and waited for over gRPC health (never fixed sleeps).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use distbank::discovery::Addresses;
use distbank::proto::peer::ReadIndexRequest;
use distbank::proto::peer::peer_client::PeerClient;
use distbank::replay::BranchClients;

/// `n` distinct ports free on 127.0.0.1 right now, for child processes to bind.
///
/// Chosen below the kernel's ephemeral range: a port from there (`bind(:0)`) is free only until
/// the kernel hands it out again, to the next `bind(:0)` (a test's proxy) or as the local port
/// of an outgoing connection, and a branch process that starts, or restarts after a kill, a
/// moment later cannot bind it. Each call in a process continues where the last one stopped,
/// from an offset derived from the process id, so concurrent tests do not pick the same ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOWEST).max(1_000);
    let start = std::process::id().wrapping_mul(7_919) % span;
    let mut ports = Vec::with_capacity(n);
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = LOWEST + (start + offset) % span;
        let Ok(port) = u16::try_from(port) else { continue };
        // Bindable now; released at once, and the kernel itself never hands out ports here.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
            if ports.len() == n {
                return ports;
            }
        }
    }
    panic!("fewer than {n} free ports between {LOWEST} and {ephemeral_low} on 127.0.0.1");
}

/// How to start one branch process.
#[derive(Debug, Clone)]
pub struct BranchSpec {
    pub id: u64,
    pub input: PathBuf,
    pub customer_port: u16,
    pub peer_port: u16,
    /// `1=host:port,2=host:port,...`: where this branch reaches its peers.
    pub peers: String,
    pub data_dir: PathBuf,
    /// Appended to across restarts, for diagnostics.
    pub log: PathBuf,
    pub args: Vec<String>,
}

/// One branch process; restartable. Killed when dropped.
pub struct BranchProcess {
    pub spec: BranchSpec,
    child: Option<Child>,
}

impl BranchProcess {
    pub fn start(spec: BranchSpec) -> BranchProcess {
        let mut process = BranchProcess { spec, child: None };
        process.spawn();
        process
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "branch {} is already running", self.spec.id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_distbank"))
            .arg("--log-format")
            .arg("text")
            .arg("branch")
            .arg("--id")
            .arg(self.spec.id.to_string())
            .arg("--input")
            .arg(&self.spec.input)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.spec.customer_port))
            .arg("--peer-listen")
            .arg(format!("127.0.0.1:{}", self.spec.peer_port))
            .arg("--peers")
            .arg(&self.spec.peers)
            .arg("--data-dir")
            .arg(&self.spec.data_dir)
            .args(&self.spec.args)
            .env("RUST_LOG", "distbank=info,openraft=error")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("branch process starts");
        self.child = Some(child);
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        self.wait_exit(timeout).expect("exits after SIGTERM")
    }

    /// Starts the process again with the same ports and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.spec.log).unwrap_or_default()
    }

    pub fn customer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.spec.customer_port)
    }

    pub fn peer_addr(&self) -> String {
        format!("127.0.0.1:{}", self.spec.peer_port)
    }
}

impl Drop for BranchProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Writes an input file with branches `1..=branches` holding `balance` and no customers'
/// events beyond one query (the input format needs a customer).
pub fn write_input(dir: &Path, branches: u64, balance: u64) -> PathBuf {
    let mut items = vec![serde_json::json!({"id": 1, "type": "customer", "events": [{"id": 1, "interface": "query"}]})];
    items.extend((1..=branches).map(|id| serde_json::json!({"id": id, "type": "branch", "balance": balance})));
    let path = dir.join("input.json");
    std::fs::write(&path, serde_json::to_string_pretty(&items).expect("json")).expect("write input");
    path
}

/// Customer-API clients for the given branches.
pub fn clients_for(processes: &[BranchProcess]) -> BranchClients {
    let addresses = Addresses::Static(processes.iter().map(|p| (p.spec.id, p.customer_url())).collect());
    let ids: Vec<u64> = processes.iter().map(|p| p.spec.id).collect();
    BranchClients::new(&addresses, &ids, Duration::from_secs(2)).expect("clients")
}

/// Waits until every branch in `processes` reports SERVING; returns how long it took.
pub async fn wait_serving(processes: &[&BranchProcess], timeout: Duration) -> Duration {
    let started = Instant::now();
    let addresses = Addresses::Static(processes.iter().map(|p| (p.spec.id, p.customer_url())).collect());
    let ids: Vec<u64> = processes.iter().map(|p| p.spec.id).collect();
    let clients = BranchClients::new(&addresses, &ids, Duration::from_secs(2)).expect("clients");
    if let Err(e) = distbank::replay::wait_until_serving(&clients, timeout).await {
        let logs: Vec<String> = processes
            .iter()
            .map(|p| format!("--- branch {} log (tail):\n{}", p.spec.id, tail(&p.log_text(), 3000)))
            .collect();
        panic!("{e}\n{}", logs.join("\n"));
    }
    started.elapsed()
}

pub fn tail(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The branch that currently leads: the one whose peer API grants a read index (a quorum
/// round, so a deposed leader does not answer).
pub async fn leader(peer_addrs: &BTreeMap<u64, String>) -> Option<u64> {
    for (&id, addr) in peer_addrs {
        let Ok(mut client) = PeerClient::connect(format!("http://{addr}")).await else {
            continue;
        };
        let mut request = tonic::Request::new(ReadIndexRequest::default());
        request.set_timeout(Duration::from_secs(2));
        if client.read_index(request).await.is_ok() {
            return Some(id);
        }
    }
    None
}

/// Polls [`leader`] until some branch leads.
pub async fn wait_leader(peer_addrs: &BTreeMap<u64, String>, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(id) = leader(peer_addrs).await {
            return id;
        }
        assert!(Instant::now() < deadline, "no leader within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
