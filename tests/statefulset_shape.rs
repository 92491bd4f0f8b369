//! The Kubernetes shape without a cluster: three `distbank branch` processes that take their
//! ids from `POD_NAME=distbank-0..1` / `POD_INDEX=2` (StatefulSet ordinals) and find their peers through an
//! address template, then `distbank replay` against them. Loopback addresses 127.0.0.{id}
//! stand in for the pods' DNS names (same ports, different hosts, as in a cluster).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

const EXPECTED: &str = r#"[{"id": 1, "recv": [{"interface": "query", "balance": 400}]}, {"id": 2, "recv": [{"interface": "deposit", "result": "success"}, {"interface": "query", "balance": 570}]}, {"id": 3, "recv": [{"interface": "withdraw", "result": "success"}, {"interface": "query", "balance": 500}]}]"#;

fn input() -> String {
    format!("{}/tests/fixtures/spec_3_input.json", env!("CARGO_MANIFEST_DIR"))
}

/// A port free on 127.0.0.1..=3 right now.
fn free_port() -> u16 {
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        if (1..=3).all(|i| TcpListener::bind((format!("127.0.0.{i}").as_str(), port)).is_ok()) {
            return port;
        }
    }
    panic!("no free port");
}

struct Branches(Vec<Child>);
impl Drop for Branches {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn branch(ordinal: u64, customer_port: u16, peer_port: u16) -> Child {
    let id = ordinal + 1;
    let mut command = Command::new(env!("CARGO_BIN_EXE_distbank"));
    if ordinal == 2 {
        // The pod-index label (via POD_INDEX) wins over the pod name.
        command.env("POD_INDEX", "2").env("POD_NAME", "renamed-pod");
    } else {
        command.env("POD_NAME", format!("distbank-{ordinal}"));
    }
    command
        .arg("branch")
        .env("DISTBANK_INPUT", input())
        .env("DISTBANK_LISTEN", format!("127.0.0.{id}:{customer_port}"))
        .env("DISTBANK_PEER_LISTEN", format!("127.0.0.{id}:{peer_port}"))
        .env("DISTBANK_PEER_TEMPLATE", format!("127.0.0.{{id}}:{peer_port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("branch starts")
}

#[test]
fn branches_from_pod_names_and_a_replay_against_them() {
    let (customer_port, peer_port) = (free_port(), free_port());
    let mut branches = Branches(
        (0..3)
            .map(|ordinal| branch(ordinal, customer_port, peer_port))
            .collect(),
    );

    // What `helm test` runs: every branch answers SERVING over gRPC health.
    let health = Command::new(env!("CARGO_BIN_EXE_distbank"))
        .args(["health-check", "--count", "3", "--timeout", "60", "--addr-template"])
        .arg(format!("http://127.0.0.{{id}}:{customer_port}"))
        .output()
        .expect("health-check runs");
    assert!(
        health.status.success(),
        "health-check: {}",
        String::from_utf8_lossy(&health.stderr)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let output = dir.path().join("output.json");
    let replay = |output: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_distbank"))
            .args(["replay", &input(), "--wait-timeout", "60", "-o"])
            .arg(output)
            .env("DISTBANK_BRANCH_ADDR", format!("http://127.0.0.{{id}}:{customer_port}"))
            .output()
            .expect("replay runs")
    };
    let result = replay(&output);
    assert!(
        result.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(std::fs::read_to_string(&output).expect("output"), EXPECTED);

    // A second run of the same Job gives the same output (idempotent event ids).
    let again = dir.path().join("again.json");
    let result = replay(&again);
    assert!(
        result.status.success(),
        "second replay: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(std::fs::read_to_string(&again).expect("output"), EXPECTED);

    // SIGTERM: every branch drains and exits 0.
    for child in &branches.0 {
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
    for child in &mut branches.0 {
        assert_eq!(child.wait().expect("exits").code(), Some(0));
    }
    branches.0.clear();
}

fn branch_error(pod_name: &str) -> (Option<i32>, String) {
    branch_error_with(pod_name, "")
}

fn branch_error_with(pod_name: &str, pod_index: &str) -> (Option<i32>, String) {
    let result = Command::new(env!("CARGO_BIN_EXE_distbank"))
        .env("POD_INDEX", pod_index)
        .args([
            "branch",
            "--input",
            &input(),
            "--listen",
            "127.0.0.1:0",
            "--peer-listen",
            "127.0.0.1:0",
        ])
        .args(["--peer-template", "127.0.0.1:{id}"])
        .env("POD_NAME", pod_name)
        .output()
        .expect("runs");
    (
        result.status.code(),
        String::from_utf8_lossy(&result.stderr).into_owned(),
    )
}

#[test]
fn clear_errors_for_pod_names_without_a_valid_ordinal() {
    let (code, stderr) = branch_error("distbank");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("\"distbank\"") && stderr.contains("NAME-ORDINAL"),
        "{stderr}"
    );
    let (code, stderr) = branch_error("distbank-3");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("branch id 4") && stderr.contains("1..=3"), "{stderr}");
    let (code, stderr) = branch_error_with("distbank-0", "first");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("POD_INDEX") && stderr.contains("first"), "{stderr}");
}
