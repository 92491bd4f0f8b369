//! A leader that stops cleanly hands the leadership over (TimeoutNow) instead of leaving the
//! voters to wait out its lease and an election timeout.
//!
//! The election timeout here is long (10 s, lease 20 s): without a hand-off no voter could
//! campaign until 30 s after the leader's last heartbeat, so a new leader within the 15 s the
//! test allows can only come from the hand-off, however slow the machine. The leader is
//! younger than its own lease, so its vote handler refuses the first election: the new
//! leader wins on its second try, after the old one has stepped down on meeting its term.

mod support;

use std::time::Duration;

use distbank::account::{Operation, Outcome};
use distbank::branch::BranchConfig;
use distbank::replication::RaftTiming;
use tokio::time::Instant;

const ELECTION_TIMEOUT_MS: u64 = 10_000;
/// Well below the 30 s a voter would wait without a hand-off.
const MOVE_WITHIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_over_and_writes_go_on() {
    // Three voters and a learner, whose customer writes and reads throughout.
    let mut members = support::start_members(4, |config| BranchConfig {
        timing: RaftTiming {
            heartbeat_ms: 50,
            election_timeout_min_ms: ELECTION_TIMEOUT_MS,
            election_timeout_max_ms: 2 * ELECTION_TIMEOUT_MS,
            ..RaftTiming::default()
        },
        request_timeout: MOVE_WITHIN,
        standalone: true,
        ..config
    })
    .await;
    let learner = members.pop().expect("four members");
    let at = support::leader_index(&members).await;
    let old = members.remove(at);
    let old_id = old.running.branch.id();
    let old_term = old.running.branch.raft().metrics().borrow().current_term;
    let first = learner.running.branch.execute(Some(1), Operation::Deposit(10)).await;
    assert!(matches!(first, Ok(Outcome::Success)), "{first:?}");

    let stopping = Instant::now();
    old.stop.cancel();
    tokio::time::timeout(MOVE_WITHIN * 2, old.running.join())
        .await
        .expect("the old leader stops")
        .expect("and stops cleanly");
    let stopped = stopping.elapsed();
    let second = learner.running.branch.execute(Some(2), Operation::Deposit(20)).await;
    let written = stopping.elapsed();
    assert!(
        matches!(second, Ok(Outcome::Success)),
        "a write after the leader stopped: {second:?} after {written:?} (no new leader: the hand-off failed)"
    );
    let raft = learner.running.branch.raft().metrics().borrow().clone();
    let new_leader = raft.current_leader.expect("a leader");
    assert!(
        new_leader != old_id && members.iter().any(|m| m.running.branch.id() == new_leader),
        "branch {new_leader} leads, the old leader was {old_id}"
    );
    // One failed election (the young leader refuses), one won: no more terms than that.
    assert!(
        (old_term + 1..=old_term + 2).contains(&raft.current_term),
        "term {} after {old_term}",
        raft.current_term
    );
    let balance = learner
        .running
        .branch
        .linearizable_read(Instant::now() + MOVE_WITHIN)
        .await;
    assert!(matches!(balance, Ok(Outcome::Balance(130))), "{balance:?}");
    println!(
        "hand-off: leader {old_id} stopped in {stopped:?}, branch {new_leader} leads in term {}, \
         next write answered {written:?} after the stop began",
        raft.current_term
    );

    // All at once, as at the end of a run: nobody takes over, nobody waits for long.
    let rest: Vec<_> = members.into_iter().chain([learner]).collect();
    for member in &rest {
        member.stop.cancel();
    }
    for member in rest {
        let _ = tokio::time::timeout(MOVE_WITHIN * 2, member.running.join()).await;
    }
}
