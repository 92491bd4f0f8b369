//! Interop with other gRPC stacks through the original wire API (proto/banks.proto): a Python
//! client generated with grpcio-tools replays the spec example against `distbank server`, and
//! `distbank client` replays it against a small Python server generated from the same proto.
//!
//! Needs a Python with grpcio and grpcio-tools: `DISTBANK_PYTHON` (set by scripts/test.sh,
//! which creates the virtualenv), else that virtualenv if present, else `python3`.

use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const EXPECTED: &str = r#"[{"id": 1, "recv": [{"interface": "query", "balance": 400}]}, {"id": 2, "recv": [{"interface": "deposit", "result": "success"}, {"interface": "query", "balance": 570}]}, {"id": 3, "recv": [{"interface": "withdraw", "result": "success"}, {"interface": "query", "balance": 500}]}]"#;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    // scripts/test.sh's virtualenv, when cargo test runs on its own.
    let cached = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|cache| cache.join("distbank/venv/bin/python"))
        .filter(|path| path.exists());
    let python = std::env::var_os("DISTBANK_PYTHON")
        .map(PathBuf::from)
        .or(cached)
        .unwrap_or_else(|| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} lacks grpcio/grpcio-tools: run the tests through scripts/test.sh (it creates the virtualenv) or set DISTBANK_PYTHON",
        python.display()
    );
    python
}

/// Generates banks_pb2*.py from the repository's proto into `dir`.
fn generate(python: &Path, dir: &Path) {
    let status = Command::new(python)
        .args(["-m", "grpc_tools.protoc", "-Iproto"])
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .arg("proto/banks.proto")
        .current_dir(repo())
        .status()
        .expect("protoc runs");
    assert!(status.success(), "grpc_tools.protoc failed");
}

/// A base port B with B+1..=B+branches free on 127.0.0.1 right now.
fn free_base_port(branches: u16) -> u16 {
    for _ in 0..50 {
        let probe = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = probe.local_addr().expect("addr").port().saturating_sub(1);
        drop(probe);
        if base > 1024
            && base < 65535 - branches
            && (1..=branches).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return base;
        }
    }
    panic!("no free port range found");
}

/// Waits until `child` prints a line containing `needle` on stdout.
fn wait_for_line(child: &mut Child, needle: &'static str) {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(needle) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no {needle:?} line within 60 s"));
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Kills the child if the test fails half-way.
struct Guard(Option<Child>);
impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn python_client_against_distbank_server() {
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    generate(&python, dir.path());
    let base = free_base_port(3);
    let input = repo().join("tests/fixtures/spec_3_input.json");
    let server = Command::new(env!("CARGO_BIN_EXE_distbank"))
        .args([
            "server",
            &input.to_string_lossy(),
            "--base-port",
            &base.to_string(),
            "--host",
            "127.0.0.1",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("distbank server starts");
    let mut guard = Guard(Some(server));
    wait_for_line(guard.0.as_mut().expect("child"), "serving");

    let output = dir.path().join("output.json");
    let status = Command::new(&python)
        .arg(repo().join("tests/interop/seed_client.py"))
        .arg(dir.path())
        .arg(&input)
        .args(["127.0.0.1", &base.to_string()])
        .arg(&output)
        .status()
        .expect("python client runs");
    assert!(status.success(), "python client failed");
    assert_eq!(std::fs::read_to_string(&output).expect("output"), EXPECTED);

    // SIGTERM: drain and exit 0.
    let mut server = guard.0.take().expect("child");
    sigterm(&server);
    let exit = server.wait().expect("server exits");
    assert_eq!(exit.code(), Some(0), "distbank server exit after SIGTERM");
}

#[test]
fn distbank_client_against_python_server() {
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    generate(&python, dir.path());
    let base = free_base_port(3);
    let input = repo().join("tests/fixtures/spec_3_input.json");
    let server = Command::new(&python)
        .arg("-u")
        .arg(repo().join("tests/interop/seed_server.py"))
        .arg(dir.path())
        .arg(&input)
        .args(["127.0.0.1", &base.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python server starts");
    let mut guard = Guard(Some(server));
    wait_for_line(guard.0.as_mut().expect("child"), "READY");

    let work = tempfile::tempdir().expect("tempdir");
    let result = Command::new(env!("CARGO_BIN_EXE_distbank"))
        .args([
            "client",
            &input.to_string_lossy(),
            "--base-port",
            &base.to_string(),
            "--host",
            "127.0.0.1",
        ])
        .current_dir(work.path())
        .output()
        .expect("distbank client runs");
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    // Like the original client.py: output.json in the working directory.
    assert_eq!(
        std::fs::read_to_string(work.path().join("output.json")).expect("output"),
        EXPECTED
    );

    let mut server = guard.0.take().expect("child");
    sigterm(&server);
    let _ = server.wait();
}
