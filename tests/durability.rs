//! `distbank branch --data-dir`: what a branch acknowledged survives SIGKILL, a restarted branch
//! recovers from its directory and catches up before it reports SERVING, the whole cluster
//! survives being killed at once, query answers survive restarts, a damaged log file is
//! reported, never used, a voter whose directory was lost votes only once caught up, and a
//! branch behind the compacted log catches up from a snapshot.

mod support;

#[path = "support/processes.rs"]
mod processes;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use processes::{BranchProcess, BranchSpec, clients_for, free_ports, wait_leader, wait_serving};

const INITIAL: u64 = 400;
const WAIT: Duration = Duration::from_secs(90);

/// Three branches (all voting) with data directories under `dir`.
fn start_three(dir: &Path) -> Vec<BranchProcess> {
    start_three_with(dir, &[])
}

fn start_three_with(dir: &Path, extra: &[&str]) -> Vec<BranchProcess> {
    let mut args = vec!["--voters".to_string(), "3".to_string()];
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let input = processes::write_input(dir, 3, INITIAL);
    let ports = free_ports(6);
    let peers = (1..=3u64)
        .map(|id| format!("{id}=127.0.0.1:{}", ports[3 + id as usize - 1]))
        .collect::<Vec<_>>()
        .join(",");
    (1..=3u64)
        .map(|id| {
            BranchProcess::start(BranchSpec {
                id,
                input: input.clone(),
                customer_port: ports[id as usize - 1],
                peer_port: ports[3 + id as usize - 1],
                peers: peers.clone(),
                data_dir: dir.join(format!("data-{id}")),
                log: dir.join(format!("branch-{id}.log")),
                args: args.clone(),
            })
        })
        .collect()
}

fn peer_addrs(processes: &[BranchProcess]) -> BTreeMap<u64, String> {
    processes.iter().map(|p| (p.spec.id, p.peer_addr())).collect()
}

async fn all_serving(processes: &[BranchProcess]) -> Duration {
    wait_serving(&processes.iter().collect::<Vec<_>>(), WAIT).await
}

/// One customer call with a fixed event id, retried (same id) through elections; panics on a
/// refusal or after a minute.
async fn call(processes: &[BranchProcess], branch: u64, event_id: u64, operation: &str, amount: i32) -> (String, i32) {
    let clients = clients_for(processes);
    let started = Instant::now();
    loop {
        let mut bank = support::bank_client(&clients, branch);
        match support::call(&mut bank, Some(event_id), operation, amount).await {
            Ok(reply) => return (reply.status, reply.balance),
            Err(status)
                if distbank::transport::is_transient(&status) && started.elapsed() < Duration::from_secs(60) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("{operation} {amount} (event {event_id}) on branch {branch}: {status}"),
        }
    }
}

async fn balance(processes: &[BranchProcess], branch: u64, event_id: u64) -> i32 {
    let (status, balance) = call(processes, branch, event_id, "query", 0).await;
    assert_eq!(status, "success");
    balance
}

/// Deposits 1 on `branch` as `event_id`, then expects `balance_after` on every branch (its
/// queries are events `first_query + id`): a recovered branch must also take new writes and
/// pass them on.
async fn deposit_one_everywhere(
    processes: &[BranchProcess],
    branch: u64,
    event_id: u64,
    balance_after: i32,
    first_query: u64,
) {
    let (status, _) = call(processes, branch, event_id, "deposit", 1).await;
    assert_eq!(status, "success", "deposit (event {event_id}) on branch {branch}");
    expect_everywhere(processes, balance_after, first_query).await;
}

/// Moves a stopped branch's data directory aside (to `<dir>.<suffix>`), as an operator does
/// with a lost or damaged one: the branch restarts empty.
fn move_data_dir_away(branch: &BranchProcess, suffix: &str) {
    let data = &branch.spec.data_dir;
    std::fs::rename(data, data.with_extension(suffix)).expect("move the directory away");
}

/// A linearizable read of `expected` on every branch (its queries are events `first_query + id`).
async fn expect_everywhere(processes: &[BranchProcess], expected: i32, first_query: u64) {
    for id in 1..=processes.len() as u64 {
        assert_eq!(balance(processes, id, first_query + id).await, expected, "branch {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_of_the_leader_and_of_every_branch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut branches = start_three(dir.path());
    all_serving(&branches).await;

    for event in 1..=5u64 {
        let (status, _) = call(&branches, 1 + event % 3, 100 + event, "deposit", 10).await;
        assert_eq!(status, "success");
    }

    // SIGKILL the leader; the other two elect a new one and go on.
    let leader = wait_leader(&peer_addrs(&branches), WAIT).await;
    let victim = leader as usize - 1;
    branches[victim].kill9();
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for event in 6..=10u64 {
        let (status, _) = call(&branches, survivors[event as usize % 2], 100 + event, "deposit", 10).await;
        assert_eq!(status, "success");
    }
    let (status, _) = call(&branches, survivors[0], 111, "withdraw", 30).await;
    assert_eq!(status, "success");
    let expected = (INITIAL + 100 - 30) as i32;

    // The old leader comes back from its directory, catches up, and only then serves.
    branches[victim].restart();
    let recovery = wait_serving(&[&branches[victim]], WAIT).await;
    assert_eq!(balance(&branches, leader, 200).await, expected);
    let log = branches[victim].log_text();
    assert!(
        log.contains("recovered consensus state from the data directory"),
        "{log}"
    );
    println!("restarted ex-leader {leader} SERVING after {recovery:?}");

    // Every branch killed at once: nothing acknowledged is lost. Without the data directories
    // the cluster would start over at the initial balance.
    for branch in &mut branches {
        branch.kill9();
    }
    let restarted = Instant::now();
    for branch in &mut branches {
        branch.restart();
    }
    all_serving(&branches).await;
    println!(
        "whole cluster SERVING {:?} after a restart from disk",
        restarted.elapsed()
    );
    expect_everywhere(&branches, expected, 300).await;
    // The event-id table survived too: a retried deposit is answered from it, not re-applied.
    let (status, _) = call(&branches, 2, 101, "deposit", 10).await;
    assert_eq!(status, "success");
    assert_eq!(balance(&branches, 3, 400).await, expected);

    for branch in &mut branches {
        assert_eq!(branch.terminate(WAIT).code(), Some(0), "clean exit after SIGTERM");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_answers_survive_a_restart_of_every_branch_and_hold_on_every_branch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut branches = start_three(dir.path());
    all_serving(&branches).await;
    assert_eq!(balance(&branches, 2, 1).await, INITIAL as i32);
    let (status, _) = call(&branches, 1, 2, "deposit", 50).await;
    assert_eq!(status, "success");
    // The branch that answered stops first (while the others can still commit what it has
    // pending), then the rest: a rolling stop, then everything comes back from disk.
    for at in [1, 0, 2] {
        assert_eq!(branches[at].terminate(WAIT).code(), Some(0), "clean exit after SIGTERM");
    }
    for branch in &mut branches {
        branch.restart();
    }
    all_serving(&branches).await;
    // A re-run of the query gets the answer it got before the deposit, on every branch (each
    // learned it from the log: none of them holds it in memory any more)...
    for id in 1..=3 {
        assert_eq!(balance(&branches, id, 1).await, INITIAL as i32, "branch {id}");
    }
    // ...while a new query sees the deposit, and a write cannot take the query's id.
    assert_eq!(balance(&branches, 3, 3).await, INITIAL as i32 + 50);
    let clients = clients_for(&branches);
    let mut bank = support::bank_client(&clients, 2);
    let reused = support::call(&mut bank, Some(1), "deposit", 10).await;
    assert_eq!(reused.map_err(|s| s.code()).err(), Some(tonic::Code::AlreadyExists));
    for branch in &mut branches {
        assert_eq!(branch.terminate(WAIT).code(), Some(0), "clean exit after SIGTERM");
    }
}

/// Byte offset of the last record in a log file (records: 12-byte header, length first).
fn last_record_offset(bytes: &[u8]) -> usize {
    let mut offset = 0;
    let mut last = 0;
    while offset + 12 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes")) as usize;
        last = offset;
        offset += 12 + len;
    }
    assert_eq!(offset, bytes.len(), "the log file is a sequence of whole records");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_log_is_refused_a_torn_tail_is_cut_off_and_an_emptied_voter_rejoins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut branches = start_three(dir.path());
    all_serving(&branches).await;
    for event in 1..=4u64 {
        let (status, _) = call(&branches, 1 + event % 3, event + 10, "deposit", 25).await;
        assert_eq!(status, "success");
    }
    let expected = (INITIAL + 100) as i32;
    // Every replica has applied everything (a linearizable read on each), then all stop.
    expect_everywhere(&branches, expected, 20).await;
    for branch in &mut branches {
        branch.kill9();
    }

    // Branch 2: flip bytes inside its last record. It must refuse to start, naming the file
    // and the record's offset, and exit non-zero.
    let wal = branches[1].spec.data_dir.join("raft.wal");
    let mut bytes = std::fs::read(&wal).expect("read log");
    let offset = last_record_offset(&bytes);
    let end = bytes.len();
    for byte in &mut bytes[end - 3..] {
        *byte ^= 0x5A;
    }
    std::fs::write(&wal, &bytes).expect("write log");
    branches[1].restart();
    let status = branches[1].wait_exit(WAIT).expect("a branch with a corrupt log exits");
    assert_eq!(status.code(), Some(1));
    let log = branches[1].log_text();
    assert!(
        log.contains(&format!("{}: corrupt at byte offset {offset}", wal.display())) && log.contains("checksum"),
        "{log}"
    );

    // Branch 3: cut its last record short (a write torn by a crash, never acknowledged).
    let wal = branches[2].spec.data_dir.join("raft.wal");
    let len = std::fs::metadata(&wal).expect("metadata").len();
    let file = std::fs::OpenOptions::new().write(true).open(&wal).expect("open");
    file.set_len(len - 5).expect("cut");
    drop(file);
    branches[0].restart();
    branches[2].restart();
    wait_serving(&[&branches[0], &branches[2]], WAIT).await;
    let log = branches[2].log_text();
    assert!(log.contains("cutting off a torn final record"), "{log}");
    assert_eq!(balance(&branches, 3, 30).await, expected);
    assert_eq!(balance(&branches, 1, 31).await, expected);

    // The documented recovery for branch 2 (docs/operations.md): move its directory away. It
    // rejoins empty and the leader sends it everything, which is safe because the other two
    // voters, a majority, kept their data and stay up until it has caught up.
    move_data_dir_away(&branches[1], "corrupt");
    branches[1].restart();
    wait_serving(&[&branches[1]], WAIT).await;
    assert_eq!(balance(&branches, 2, 32).await, expected);
    deposit_one_everywhere(&branches, 2, 33, expected + 1, 40).await;

    // The same for branch 1, the voter that forms the cluster when it finds itself
    // uninitialized: empty again, it must rejoin the existing cluster, not found a new one.
    branches[0].kill9();
    move_data_dir_away(&branches[0], "lost");
    branches[0].restart();
    wait_serving(&[&branches[0]], WAIT).await;
    assert_eq!(balance(&branches, 1, 50).await, expected + 1);
    deposit_one_everywhere(&branches, 1, 51, expected + 2, 60).await;
}

/// A branch that is behind what the others' logs still hold is sent a snapshot: with a
/// snapshot every 10 entries the log keeps only the last one, so an emptied branch can only
/// catch up from the leader's snapshot, which must carry the balance and the event-id table
/// (a retried old event is answered, not applied again) and survive the branch's next restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_behind_the_compacted_log_catches_up_from_a_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut branches = start_three_with(dir.path(), &["--snapshot-every", "10"]);
    all_serving(&branches).await;
    for event in 100..140u64 {
        let (status, _) = call(&branches, 1 + event % 3, event, "deposit", 5).await;
        assert_eq!(status, "success", "event {event}");
    }
    let expected = (INITIAL + 200) as i32;
    assert_eq!(balance(&branches, 1, 200).await, expected);

    branches[2].kill9();
    move_data_dir_away(&branches[2], "lost");
    branches[2].restart();
    wait_serving(&[&branches[2]], WAIT).await;
    let log = branches[2].log_text();
    assert!(log.contains("installed the leader's snapshot"), "{log}");
    assert_eq!(balance(&branches, 3, 201).await, expected);
    // The first deposit again, on the branch that only has the snapshot: recorded, not re-applied.
    let (status, _) = call(&branches, 3, 100, "deposit", 5).await;
    assert_eq!(status, "success");
    assert_eq!(balance(&branches, 3, 202).await, expected);

    // Restarted, it recovers from the snapshot it persisted, plus the entries after it.
    branches[2].kill9();
    branches[2].restart();
    wait_serving(&[&branches[2]], WAIT).await;
    assert_eq!(balance(&branches, 3, 203).await, expected);
    deposit_one_everywhere(&branches, 3, 204, expected + 1, 210).await;
}

/// A voter that lost its data must not help elect a voter that lacks an acknowledged write.
/// The write is committed on the leader and branch X while branch Y is down; then X loses its
/// directory and the leader dies. Y (without the write) and the emptied X are a majority:
/// had X voted, Y would lead and the write would be gone for good, overwritten on the old
/// leader when it came back. X withholds its vote instead, so nobody answers until the old
/// leader is back, and then everyone has the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_voter_does_not_elect_a_leader_that_lacks_acknowledged_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Quick elections, and customer calls that give up quickly while there is no leader.
    let fast = [
        "--election-timeout-ms",
        "300",
        "--heartbeat-ms",
        "50",
        "--request-timeout",
        "1",
    ];
    let mut branches = start_three_with(dir.path(), &fast);
    all_serving(&branches).await;
    let leader = wait_leader(&peer_addrs(&branches), WAIT).await;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let (x, y) = (others[0], others[1]);
    let index = |id: u64| id as usize - 1;

    branches[index(y)].kill9();
    let (status, _) = call(&branches, leader, 1, "deposit", 100).await;
    assert_eq!(status, "success");
    let expected = (INITIAL + 100) as i32;
    // On the leader and X; X loses it with its directory, then the leader dies.
    assert_eq!(balance(&branches, x, 2).await, expected);
    branches[index(x)].kill9();
    move_data_dir_away(&branches[index(x)], "lost");
    branches[index(leader)].kill9();
    branches[index(y)].restart();
    branches[index(x)].restart();

    // Y would be elected within ~1.5 s with X's vote; for many election timeouts, no branch
    // answers, and none ever answers without the write.
    let clients = clients_for(&branches);
    let window = Instant::now() + Duration::from_secs(6);
    let mut event = 100;
    while Instant::now() < window {
        for id in [x, y] {
            event += 1;
            let mut bank = support::bank_client(&clients, id);
            if let Ok(reply) = support::call(&mut bank, Some(event), "query", 0).await {
                panic!(
                    "branch {id} answered {reply:?} without the old leader; its log:\n{}",
                    processes::tail(&branches[index(id)].log_text(), 3000)
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = branches[index(x)].log_text();
    assert!(
        log.contains("the data directory is empty: not voting until caught up"),
        "{log}"
    );

    branches[index(leader)].restart();
    all_serving(&branches).await;
    expect_everywhere(&branches, expected, 200).await;
    let log = branches[index(x)].log_text();
    assert!(
        log.contains("caught up after starting with an empty data directory"),
        "{log}"
    );
}
