//! A Jepsen-style fault test. Five `distbank branch` processes (all voting, each with a data
//! directory) serve concurrent clients while a nemesis SIGKILLs and restarts branches (the
//! leader on every other kill; every other time the leader is stopped with SIGTERM instead, so
//! that it hands the leadership over under load) and cuts one branch off from the others. Every peer connection
//! goes through a TCP proxy in this test (`support/proxy.rs`: branch A reaches branch B at the
//! proxy for A→B), so a partition is exact: the proxies to and from the victim refuse new
//! connections and drop open ones.
//!
//! Clients retry every failed call with the same event id on another branch, so each call is
//! one operation from its first attempt to its answer. Checked afterwards: the history is
//! linearizable (the Wing-Gong/Lowe checker in `support/linearizability.rs`), every
//! acknowledged write is in the replicated event-id table, all replicas show one balance, no
//! balance was ever negative, and the balance equals initial + successful deposits − successful
//! withdrawals. A summary line reports operations, faults and recovery times.

mod support;

#[path = "support/linearizability.rs"]
mod linearizability;
#[path = "support/processes.rs"]
mod processes;
#[path = "support/proxy.rs"]
mod proxy;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use distbank::replay::BranchClients;
use futures::StreamExt as _;
use linearizability::{Call, Op, Ret, Verdict};
use processes::{BranchProcess, wait_leader, wait_serving};
use proxy::Network;
use rand::Rng as _;
use rand::SeedableRng as _;

const BRANCHES: u64 = 5;
const CLIENTS: usize = 6;
const INITIAL: u64 = 100;
/// How long the nemesis keeps injecting faults (the clients run meanwhile).
const FAULT_PHASE: Duration = Duration::from_secs(40);
const WAIT: Duration = Duration::from_secs(90);
/// A call that has not been answered after this long (retries included) fails the test.
const CALL_BUDGET: Duration = Duration::from_secs(60);

// --- clients ------------------------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    retries: AtomicU64,
}

/// One client: random operations on random branches until `stop`; each call is retried with
/// the same event id (on another random branch) until it is answered.
async fn client(
    index: usize,
    clients: BranchClients,
    start: Instant,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    seed: u64,
) -> Vec<(Call, Option<u64>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1000) + index as u64);
    let mut history = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let event_id = (index as u64 + 1) * 1_000_000 + n;
        let (op, name, amount) = linearizability::random_op(&mut rng);
        let invoke = start.elapsed().as_nanos() as u64;
        let first = Instant::now();
        let reply = loop {
            let branch = rng.random_range(1..=BRANCHES);
            let mut bank = support::bank_client(&clients, branch);
            let mut request = tonic::Request::new(distbank::proto::bank::TransactionRequest {
                customer_id: 1,
                operation: name.to_string(),
                amount: amount as i32,
            });
            request.set_timeout(Duration::from_secs(5));
            request
                .metadata_mut()
                .insert(distbank::proto::EVENT_ID_METADATA, event_id.into());
            match bank.msg_delivery(request).await {
                Ok(reply) => break reply.into_inner(),
                Err(status) if distbank::transport::is_transient(&status) => {
                    assert!(
                        first.elapsed() < CALL_BUDGET,
                        "client {index}: {name} {amount} (event {event_id}) unanswered for {CALL_BUDGET:?}: {status}"
                    );
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    // Another branch right away; pause briefly only if all may be electing.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => panic!("client {index}: {name} {amount} (event {event_id}) refused: {status}"),
            }
        };
        let complete = start.elapsed().as_nanos() as u64;
        let ret = match (op, reply.status.as_str()) {
            (Op::Query, "success") => Ret::Balance(
                u64::try_from(reply.balance).unwrap_or_else(|_| panic!("negative balance {}", reply.balance)),
            ),
            (_, "success") => Ret::Success,
            (_, "fail") => Ret::Fail,
            (_, other) => panic!("unexpected status {other:?}"),
        };
        let write_id = (op != Op::Query).then_some(event_id);
        history.push((
            Call {
                client: index,
                op,
                ret,
                invoke,
                complete: complete.max(invoke + 1),
            },
            write_id,
        ));
    }
    history
}

// --- the nemesis ----------------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Faults {
    kills: u32,
    leader_kills: u32,
    /// The leader stopped with SIGTERM: it hands the leadership over before it exits.
    leader_stops: u32,
    partitions: u32,
    leader_partitions: u32,
    /// Restart → SERVING (recovered from disk and caught up).
    restart_recovery: Vec<Duration>,
    /// Leader killed → another branch leads.
    failover: Vec<Duration>,
    /// SIGTERM to the leader → another branch leads (the old one's exit included).
    handoff: Vec<Duration>,
    /// Heal → the isolated branch answers a linearizable read again.
    heal_recovery: Vec<Duration>,
    timeline: Vec<String>,
}

struct Cluster {
    branches: Vec<BranchProcess>,
    network: Network,
    direct_peers: BTreeMap<u64, String>,
    clients: BranchClients,
}

impl Cluster {
    fn branch(&mut self, id: u64) -> &mut BranchProcess {
        &mut self.branches[id as usize - 1]
    }
}

/// A linearizable read on `branch` that succeeds; retried until `WAIT`.
async fn read_on(clients: &BranchClients, branch: u64) -> i32 {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut bank = support::bank_client(clients, branch);
        match support::call(&mut bank, None, "query", 0).await {
            Ok(reply) => return reply.balance,
            Err(status) => assert!(Instant::now() < deadline, "branch {branch} never answered: {status}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn nemesis(cluster: &mut Cluster, seed: u64, start: Instant) -> Faults {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut faults = Faults::default();
    let began = Instant::now();
    let mut round = 0u32;
    // Let the clients run undisturbed first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while began.elapsed() < FAULT_PHASE {
        round += 1;
        let leader = wait_leader(&cluster.direct_peers, WAIT).await;
        let at = start.elapsed().as_secs_f64();
        if round % 2 == 1 {
            // Kill: the leader every other time, else a random branch.
            let victim = if round % 4 == 1 {
                leader
            } else {
                rng.random_range(1..=BRANCHES)
            };
            let killed = Instant::now();
            let graceful = victim == leader && round % 8 == 5;
            if graceful {
                let status = cluster.branch(victim).terminate(WAIT);
                assert_eq!(status.code(), Some(0), "the leader exits cleanly after SIGTERM");
                faults.leader_stops += 1;
            } else {
                cluster.branch(victim).kill9();
                faults.kills += 1;
            }
            if victim == leader {
                if !graceful {
                    faults.leader_kills += 1;
                }
                let others: BTreeMap<u64, String> = cluster
                    .direct_peers
                    .iter()
                    .filter(|(id, _)| **id != victim)
                    .map(|(id, addr)| (*id, addr.clone()))
                    .collect();
                wait_leader(&others, WAIT).await;
                if graceful {
                    faults.handoff.push(killed.elapsed());
                } else {
                    faults.failover.push(killed.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
            cluster.branch(victim).restart();
            let recovery = wait_serving(&[&cluster.branches[victim as usize - 1]], WAIT).await;
            faults.restart_recovery.push(recovery);
            faults.timeline.push(format!(
                "{at:.1}s {} branch {victim}{} (down {:.1}s, SERVING {:.0} ms after restart)",
                if graceful { "SIGTERM" } else { "kill -9" },
                if victim == leader { " (leader)" } else { "" },
                killed.elapsed().as_secs_f64() - recovery.as_secs_f64(),
                recovery.as_secs_f64() * 1e3
            ));
        } else {
            let victim = if round % 4 == 2 {
                leader
            } else {
                rng.random_range(1..=BRANCHES)
            };
            cluster.network.isolate(victim);
            faults.partitions += 1;
            if victim == leader {
                faults.leader_partitions += 1;
            }
            let length = Duration::from_millis(rng.random_range(2000..4000));
            tokio::time::sleep(length).await;
            cluster.network.heal();
            let healed = Instant::now();
            read_on(&cluster.clients, victim).await;
            faults.heal_recovery.push(healed.elapsed());
            faults.timeline.push(format!(
                "{at:.1}s partition branch {victim}{} for {:.1}s (read served {:.0} ms after heal)",
                if victim == leader { " (leader)" } else { "" },
                length.as_secs_f64(),
                healed.elapsed().as_secs_f64() * 1e3
            ));
        }
        // A quiet moment between faults.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    faults
}

fn summary(durations: &[Duration]) -> String {
    if durations.is_empty() {
        return "-".into();
    }
    let mut ms: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    format!(
        "{:.0}/{:.0}/{:.0} ms (min/median/max of {})",
        ms[0],
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        ms.len()
    )
}

async fn nemesis_run(seed: u64) {
    let test_started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let (network, branches) = proxy::start_branches(dir.path(), BRANCHES, INITIAL, |_| {
        ["--voters", "5", "--request-timeout", "3"].map(String::from).to_vec()
    })
    .await;
    let clients = processes::clients_for(&branches);
    let direct_peers = branches.iter().map(|b| (b.spec.id, b.peer_addr())).collect();
    let mut cluster = Cluster {
        branches,
        network,
        direct_peers,
        clients: clients.clone(),
    };
    wait_serving(&cluster.branches.iter().collect::<Vec<_>>(), WAIT).await;
    let startup = test_started.elapsed();

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(i, clients.clone(), start, stop.clone(), counters.clone(), seed)))
        .collect();
    let faults = nemesis(&mut cluster, seed, start).await;
    stop.store(true, Ordering::Relaxed);
    let mut recorded = Vec::new();
    for task in tasks {
        match task.await {
            Ok(calls) => recorded.extend(calls),
            Err(e) => panic!("client failed: {e}\nfaults: {:#?}", faults.timeline),
        }
    }
    let workload = start.elapsed();
    let history: Vec<Call> = recorded.iter().map(|(call, _)| call.clone()).collect();

    // 1. Linearizable.
    let checked = Instant::now();
    let verdict = linearizability::check(INITIAL, &history, 50_000_000);
    let check_time = checked.elapsed();
    assert!(
        matches!(verdict, Verdict::Linearizable { .. }),
        "history of {} calls is not linearizable: {verdict:?}\nfaults: {:#?}",
        history.len(),
        faults.timeline
    );

    // 2. The balance follows from the acknowledged writes, and was never negative.
    let expected = INITIAL as i64 + history.iter().map(linearizability::effect).sum::<i64>();
    assert!(expected >= 0, "more withdrawn than ever held: {expected}");
    if let Verdict::Linearizable { order } = &verdict {
        let mut balance = INITIAL as i64;
        for &i in order {
            balance += linearizability::effect(&history[i]);
            assert!(balance >= 0, "balance negative after call {i}");
        }
    }

    // 3. Every replica converges on that balance (each answers from its own replica after the
    //    read barrier).
    for id in 1..=BRANCHES {
        assert_eq!(
            read_on(&clients, id).await as i64,
            expected,
            "branch {id} disagrees; faults: {:#?}",
            faults.timeline
        );
    }

    let audit = Instant::now();
    // 4. No acknowledged write was lost: its event id is recorded in the replicated table. A
    //    query under a write's event id is answered ALREADY_EXISTS only where the write is
    //    recorded; each write is checked on one replica, round robin, so every replica is
    //    audited (all replicas apply the same log, and step 3 showed they agree).
    let writes: Vec<u64> = recorded.iter().filter_map(|(_, id)| *id).collect();
    let checks = writes
        .iter()
        .enumerate()
        .map(|(i, &event)| (event, 1 + i as u64 % BRANCHES));
    let lost: Vec<(u64, u64, String)> = futures::stream::iter(checks)
        .map(|(event, branch)| {
            let clients = clients.clone();
            async move {
                let deadline = Instant::now() + WAIT;
                loop {
                    let mut bank = support::bank_client(&clients, branch);
                    match support::call(&mut bank, Some(event), "query", 0).await {
                        Err(status) if status.code() == tonic::Code::AlreadyExists => return None,
                        Err(status) if distbank::transport::is_transient(&status) && Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => return Some((event, branch, format!("{other:?}"))),
                    }
                }
            }
        })
        .buffer_unordered(8)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    assert!(lost.is_empty(), "acknowledged writes missing: {lost:?}");

    let deposits = history.iter().filter(|c| matches!(c.op, Op::Deposit(_))).count();
    let withdrawals = history.iter().filter(|c| matches!(c.op, Op::Withdraw(_))).count();
    let failed = history.iter().filter(|c| c.ret == Ret::Fail).count();
    println!(
        "nemesis (seed {seed}): {} operations ({deposits} deposits, {withdrawals} withdrawals of which {failed} refused, {} queries) \
         from {CLIENTS} clients on {BRANCHES} branches in {:.1}s, {} retries; kills: {} ({} of the leader), leader stops: {}, partitions: {} ({} of the leader); \
         recovery: restart→SERVING {}, leader failover {}, hand-off on SIGTERM {}, heal→read {}; final balance {expected} on every replica; \
         {} acknowledged writes all recorded (audited round robin over the replicas in {:.1}s); linearizable: true (checked in {:.0} ms); \
         test {:.1}s (start-up {:.1}s)",
        history.len(),
        history.len() - deposits - withdrawals,
        workload.as_secs_f64(),
        counters.retries.load(Ordering::Relaxed),
        faults.kills,
        faults.leader_kills,
        faults.leader_stops,
        faults.partitions,
        faults.leader_partitions,
        summary(&faults.restart_recovery),
        summary(&faults.failover),
        summary(&faults.handoff),
        summary(&faults.heal_recovery),
        writes.len(),
        audit.elapsed().as_secs_f64(),
        check_time.as_secs_f64() * 1e3,
        test_started.elapsed().as_secs_f64(),
        startup.as_secs_f64()
    );
    for line in &faults.timeline {
        println!("  {line}");
    }
    assert!(
        faults.kills >= 2 && faults.partitions >= 2,
        "too few faults: {faults:?}"
    );
    assert!(failed > 0 && deposits > 0, "the workload should mix outcomes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_partitions_lose_nothing_and_stay_linearizable() {
    let seed = std::env::var("DISTBANK_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        });
    nemesis_run(seed).await;
}
