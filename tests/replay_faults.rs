//! Replay under faults: the course's 50-branch input replayed by `distbank replay` against 50
//! `distbank branch` processes (3 voters, every branch with a data directory) while the
//! leader is SIGKILLed and restarted, twice. The replay retries each event with its event id
//! through the restarts and leader changes, and the output is still byte for byte the
//! course's reference output.

mod support;

#[path = "support/processes.rs"]
mod processes;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use processes::{BranchProcess, BranchSpec, free_ports, wait_leader, wait_serving};

const BRANCHES: u64 = 50;
const INITIAL: i32 = 400;
const WAIT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_during_the_50_branch_replay_keeps_the_exact_output() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = support::fixture("course_50_input.json");
    let ports = free_ports(2 * BRANCHES as usize);
    let port = |id: u64, peer: bool| ports[(id - 1 + if peer { BRANCHES } else { 0 }) as usize];
    let peers = (1..=BRANCHES)
        .map(|id| format!("{id}=127.0.0.1:{}", port(id, true)))
        .collect::<Vec<_>>()
        .join(",");
    let mut branches: Vec<BranchProcess> = (1..=BRANCHES)
        .map(|id| {
            BranchProcess::start(BranchSpec {
                id,
                input: input.clone(),
                customer_port: port(id, false),
                peer_port: port(id, true),
                peers: peers.clone(),
                data_dir: dir.path().join(format!("data-{id}")),
                log: dir.path().join(format!("branch-{id}.log")),
                args: vec!["--voters".into(), "3".into()],
            })
        })
        .collect();
    wait_serving(&branches.iter().collect::<Vec<_>>(), WAIT).await;
    let startup = started.elapsed();
    let voters: BTreeMap<u64, String> = branches[..3].iter().map(|b| (b.spec.id, b.peer_addr())).collect();

    let output = dir.path().join("output.json");
    let replay_log = dir.path().join("replay.log");
    let branch_addr = branches
        .iter()
        .map(|b| format!("{}={}", b.spec.id, b.customer_url()))
        .collect::<Vec<_>>()
        .join(",");
    let mut replay = Command::new(env!("CARGO_BIN_EXE_distbank"))
        .args(["replay", "--retry-budget", "120", "--wait-timeout", "120", "-o"])
        .arg(&output)
        .arg(&input)
        .env("DISTBANK_BRANCH_ADDR", &branch_addr)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&replay_log).expect("replay log"))
        .spawn()
        .expect("replay starts");
    let replay_started = Instant::now();

    // The replay has begun once the balance moved (the first customers deposit).
    let clients = processes::clients_for(&branches[BRANCHES as usize - 1..]);
    support::eventually(WAIT, "the replay to change the balance", || {
        let clients = clients.clone();
        async move {
            let mut bank = support::bank_client(&clients, BRANCHES);
            matches!(support::call(&mut bank, None, "query", 0).await, Ok(r) if r.balance != INITIAL)
        }
    })
    .await;

    let mut report = Vec::new();
    for _ in 0..2 {
        let leader = wait_leader(&voters, WAIT).await;
        assert!(
            replay.try_wait().expect("try_wait").is_none(),
            "the replay finished before the leader could be killed: the test would prove nothing"
        );
        let killed = Instant::now();
        branches[leader as usize - 1].kill9();
        let others: BTreeMap<u64, String> = voters
            .iter()
            .filter(|(id, _)| **id != leader)
            .map(|(id, addr)| (*id, addr.clone()))
            .collect();
        let successor = wait_leader(&others, WAIT).await;
        let failover = killed.elapsed();
        // Its own customers' events wait for it: restart it from its data directory.
        branches[leader as usize - 1].restart();
        let recovery = wait_serving(&[&branches[leader as usize - 1]], WAIT).await;
        report.push(format!(
            "killed leader {leader} at {:.1}s into the replay; branch {successor} led after {:.0} ms; \
             {leader} SERVING {:.0} ms after its restart",
            killed.duration_since(replay_started).as_secs_f64(),
            failover.as_secs_f64() * 1e3,
            recovery.as_secs_f64() * 1e3
        ));
    }

    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = replay.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the replay did not finish in {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = std::fs::read_to_string(&replay_log).unwrap_or_default();
    assert!(status.success(), "replay failed: {stderr}");
    assert_eq!(
        std::fs::read_to_string(&output).expect("output written"),
        support::fixture_text("course_50_output.json"),
        "the output differs from the reference"
    );
    println!(
        "replay of course_50 (50 branch processes, 3 voters, data directories) under 2 leader kills: \
         exact reference output; start-up {:.1}s, replay {:.1}s",
        startup.as_secs_f64(),
        replay_started.elapsed().as_secs_f64()
    );
    for line in &report {
        println!("  {line}");
    }
}
