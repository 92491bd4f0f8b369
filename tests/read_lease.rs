//! The leader's read lease: reads on the leader need no quorum round while its lease holds,
//! and a leader cut off from its voters stops answering reads when the lease ends (what makes
//! lease reads linearizable: followers elect no other leader before then). With
//! `--read-mode quorum` every read takes a round, so a cut-off leader refuses at once.

mod support;

use std::time::Duration;

use distbank::account::{Operation, Outcome};
use distbank::branch::{BranchConfig, BranchError};
use distbank::replication::RaftTiming;
use support::Member;
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Election timeout T: long, so that stopping two branches surely takes less than the lease
/// (1.5 T) even on a slow machine.
const ELECTION_TIMEOUT_MS: u64 = 8_000;

/// Three voting branches in this process, each with its own shutdown token.
async fn three_voters(read_lease: bool) -> Vec<Member> {
    support::start_members(3, |config| BranchConfig {
        timing: RaftTiming {
            election_timeout_min_ms: ELECTION_TIMEOUT_MS,
            election_timeout_max_ms: 2 * ELECTION_TIMEOUT_MS,
            read_lease,
            ..RaftTiming::default()
        },
        // Short, so that a read the leader cannot confirm fails quickly.
        request_timeout: Duration::from_secs(1),
        ..config
    })
    .await
}

/// Splits off the leader; the other two are stopped and gone when this returns.
async fn stop_followers(mut members: Vec<Member>) -> Member {
    let leader = members.swap_remove(support::leader_index(&members).await);
    for follower in members {
        follower.stop.cancel();
        tokio::time::timeout(TIMEOUT, follower.running.join())
            .await
            .expect("a stopped branch ends")
            .expect("ends cleanly");
    }
    leader
}

async fn read(member: &Member) -> Result<Outcome, BranchError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    member.running.branch.linearizable_read(deadline).await
}

#[tokio::test]
async fn a_cut_off_leader_answers_reads_from_its_lease_until_it_ends() {
    let members = three_voters(true).await;
    let leader = &members[support::leader_index(&members).await];
    let written = tokio::time::timeout(TIMEOUT, leader.running.branch.execute(Some(1), Operation::Deposit(50)))
        .await
        .expect("the deposit is answered");
    assert!(matches!(written, Ok(Outcome::Success)), "{written:?}");

    let leader = stop_followers(members).await;
    let stopped = Instant::now();
    // No quorum can answer now: only the lease lets the leader answer, with the latest balance.
    let answer = read(&leader).await;
    assert!(
        matches!(answer, Ok(Outcome::Balance(150))),
        "within its lease the leader answers alone: {answer:?}"
    );
    // The lease ends 1.5 T after the last acknowledgement at the latest; from then on the
    // leader must refuse, or a leader elected by the others could have changed the balance.
    let lease = Duration::from_millis(ELECTION_TIMEOUT_MS * 3 / 2);
    let refused = loop {
        let asked = Instant::now();
        match read(&leader).await {
            Ok(_) => {
                // The lease is checked after `asked` and runs from an acknowledgement sent
                // before `stopped`.
                assert!(
                    asked < stopped + lease,
                    "answered a read asked {:?} after its voters were gone, beyond the lease ({lease:?})",
                    asked - stopped
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(refused, BranchError::Unavailable(_)), "{refused}");
    assert!(
        read(&leader).await.is_err(),
        "no read is answered once the lease has ended"
    );
    leader.stop.cancel();
    let _ = tokio::time::timeout(TIMEOUT, leader.running.join()).await;
}

#[tokio::test]
async fn with_quorum_reads_a_cut_off_leader_refuses_at_once() {
    let members = three_voters(false).await;
    let leader = stop_followers(members).await;
    let refused = read(&leader).await;
    assert!(
        matches!(refused, Err(BranchError::Unavailable(_))),
        "without leases every read needs a quorum: {refused:?}"
    );
    leader.stop.cancel();
    let _ = tokio::time::timeout(TIMEOUT, leader.running.join()).await;
}
