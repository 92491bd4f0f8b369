//! When a voter starts an election: only once a majority of the voters would vote for it
//! (pre-vote, as etcd and CockroachDB do it).
//!
//! openraft 0.9 has no pre-vote. A voter cut off from the others keeps starting elections, each
//! with a higher term, and once it is reachable again that term deposes the working leader (the
//! leader's next AppendEntries is answered with the higher vote): one more election and seconds
//! without writes, caused by a branch that could not have won. So openraft's own election timer
//! is off ([`crate::replication::raft_config`]) and [`campaign`] decides instead, by openraft's
//! rule (no word from a leader for the leader lease plus a random election timeout), but first
//! asks the other voters whether they *would* grant the vote, without anyone changing term.
//! They answer with the checks openraft's vote handler makes ([`refusal`]): their own leader
//! lease has expired, and the candidate's log is at least as up to date as theirs; a leader
//! always refuses. Only with a majority (itself included) is openraft's election triggered.
//! The election itself (votes, terms, what a vote needs) stays openraft's: this only decides
//! when to ask for one, so it cannot make two leaders, only (if it were wrong) none.
//!
//! **A voter that lost its data** (started with an empty `--data-dir`: a replaced disk, the
//! recovery in docs/operations.md, an `emptyDir` pod recreated) has forgotten its vote and
//! the entries it acknowledged, and Raft's safety rests on both: with three voters, a write
//! committed on the leader and on this voter lives only on the leader now, and if the leader
//! fails before this voter has caught up, the third voter (which never had the write) would
//! win with this voter's vote and overwrite it. So until its first linearizable read succeeds
//! (the readiness check: it has applied everything committed when it asked), such a voter
//! withholds its vote, its pre-vote answers, its own campaign and hand-offs, except in the
//! cluster's formation: for a candidate whose log holds nothing but the initial membership
//! (index 0), there is nothing to lose, and a fresh install starts every voter empty. The
//! price is availability in that window (no leader until the old one is back), never a lost
//! write; in-memory branches keep no data to protect and never withhold.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use openraft::{LogId, ServerState};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Branch;
use super::handoff::Urgency;
use crate::replication::{NodeId, RaftTiming, random_below};

/// "Would you vote for me?", sent to every other voter before an election.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    pub last_log_id: Option<LogId<NodeId>>,
}

/// The answer; `refused`: why not (`None`: it would vote for the candidate).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PreVoteReply {
    pub refused: Option<String>,
}

/// What a voter's state says about elections, read from openraft's state.
#[derive(Debug, Clone)]
pub(crate) struct Standing {
    pub leads: bool,
    /// Whether this branch votes in the effective membership.
    pub votes: bool,
    /// The vote is committed: it knows a leader of its term.
    pub vote_committed: bool,
    /// When the vote was last confirmed (by the leader's AppendEntries, or by voting).
    pub vote_updated: Option<Instant>,
    pub last_log_id: Option<LogId<NodeId>>,
    /// The voters of each configuration (two during a membership change).
    pub configs: Vec<Vec<NodeId>>,
    /// Started empty and not caught up yet (the module docs, "A voter that lost its data").
    pub withholding: bool,
}

/// Why a voter that lost its data does not vote yet.
pub(crate) const WITHHELD: &str =
    "this branch started with an empty data directory and votes once it has caught up with a leader";

/// Why a voter that is `withholding` refuses a candidate with `candidate_log`: only outside
/// the cluster's formation, i.e. when that log ends beyond the initial membership (index 0)
/// and so may hold writes.
fn withheld(withholding: bool, candidate_log: Option<&LogId<NodeId>>) -> Option<&'static str> {
    (withholding && candidate_log.is_some_and(|id| id.index > 0)).then_some(WITHHELD)
}

/// Why a voter in `standing` would refuse `candidate_log` its vote now, as openraft's vote
/// handler would (a leader also refuses: it is alive, so nobody needs to replace it).
pub(crate) fn refusal(
    standing: &Standing,
    candidate_log: Option<&LogId<NodeId>>,
    now: Instant,
    lease: Duration,
) -> Option<&'static str> {
    if standing.leads {
        return Some("this branch leads");
    }
    if let Some(why) = withheld(standing.withholding, candidate_log) {
        return Some(why);
    }
    if standing.vote_committed && standing.vote_updated.is_some_and(|updated| now <= updated + lease) {
        return Some("this branch heard from its leader within the leader lease");
    }
    if candidate_log < standing.last_log_id.as_ref() {
        return Some("the candidate's log is behind this branch's");
    }
    None
}

/// Whether a voter in `standing` is due to campaign: openraft's own rule, with `timeout` the
/// random election timeout of this attempt (the only voter campaigns at once: nobody else can).
pub(crate) fn election_due(standing: &Standing, now: Instant, lease: Duration, timeout: Duration) -> bool {
    if standing.leads || !standing.votes {
        return false;
    }
    // Its own log as the candidate's: a voter that lost its data campaigns only in the formation.
    if withheld(standing.withholding, standing.last_log_id.as_ref()).is_some() {
        return false;
    }
    if standing.configs.iter().all(|voters| voters.len() == 1) {
        return true;
    }
    let wait = if standing.vote_committed {
        lease + timeout
    } else {
        timeout
    };
    standing.vote_updated.is_none_or(|updated| now >= updated + wait)
}

/// Whether `granted` holds a majority of every configuration's voters.
pub(crate) fn quorum(configs: &[Vec<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    !configs.is_empty()
        && configs
            .iter()
            .all(|voters| voters.iter().filter(|id| granted.contains(id)).count() * 2 > voters.len())
}

impl Branch {
    /// This branch's [`Standing`], read from openraft's core; `None` once Raft has stopped.
    pub(crate) async fn standing(&self) -> Option<Standing> {
        let me = self.inner.id;
        let last_log_id = self.inner.log.last_log_id();
        let withholding = self.withholding_votes();
        self.inner
            .raft
            .with_raft_state(move |state| {
                let effective = state.membership_state.effective();
                Standing {
                    leads: state.server_state == ServerState::Leader,
                    votes: effective.voter_ids().any(|id| id == me),
                    vote_committed: state.vote_ref().is_committed(),
                    vote_updated: state.vote_last_modified(),
                    last_log_id,
                    configs: effective.get_joint_config().clone(),
                    withholding,
                }
            })
            .await
            .ok()
    }

    /// Why this branch refuses a candidate with `candidate_log` its vote before openraft sees
    /// the request: it lost its data and has not caught up (the module docs).
    pub(crate) fn vote_withheld(&self, candidate_log: Option<&LogId<NodeId>>) -> Option<&'static str> {
        withheld(self.withholding_votes(), candidate_log)
    }

    pub(crate) fn withholding_votes(&self) -> bool {
        self.inner.withholding_votes.load(Ordering::Acquire)
    }

    /// A linearizable read succeeded here: a branch that started empty holds everything
    /// committed before it asked, and votes from now on.
    pub(crate) fn caught_up(&self) {
        if self.inner.withholding_votes.swap(false, Ordering::AcqRel) {
            tracing::info!(
                branch = self.inner.id,
                "caught up after starting with an empty data directory: voting again"
            );
        }
    }

    /// Whether this branch is in touch with a leader: it leads and a quorum acknowledged it
    /// within the leader lease, or it heard from its leader within the lease. A branch cut off
    /// from the leader still knows who leads (with pre-vote it starts no election, which would
    /// forget the leader) but cannot answer its customers: readiness asks this.
    pub(crate) async fn in_touch_with_leader(&self) -> bool {
        let lease = lease(&self.inner.timing);
        let quorum_ack = self.inner.raft.metrics().borrow().millis_since_quorum_ack;
        // Only the two fields readiness needs: it asks every 250 ms on every branch, and
        // `standing` would also read the log and copy the voter sets.
        let state = self
            .inner
            .raft
            .with_raft_state(|state| (state.server_state == ServerState::Leader, state.vote_last_modified()))
            .await;
        match state {
            Err(_) => false,
            Ok((true, _)) => quorum_ack.is_none_or(|ms| Duration::from_millis(ms) <= lease),
            Ok((false, heard)) => heard.is_some_and(|heard| heard.elapsed() <= lease),
        }
    }

    /// The peer service's `PreVote`: whether this branch would vote for the candidate now.
    pub(crate) async fn answer_pre_vote(&self, request: &PreVoteRequest) -> PreVoteReply {
        let lease = lease(&self.inner.timing);
        let refused = match self.standing().await {
            None => Some("Raft has stopped on this branch"),
            Some(standing) => refusal(&standing, request.last_log_id.as_ref(), Instant::now(), lease),
        };
        tracing::debug!(
            branch = self.inner.id,
            candidate = request.candidate,
            refused = refused.unwrap_or("no"),
            "pre-vote"
        );
        PreVoteReply {
            refused: refused.map(String::from),
        }
    }

    /// Asks `target` whether it would vote for this branch. An older release without the call
    /// counts as yes: it leaves the decision to the real vote, as before.
    async fn ask_pre_vote(&self, target: NodeId, request: &PreVoteRequest, timeout: Duration) -> Result<bool, String> {
        let reply = super::payload_call(self, target, request, timeout, |mut client, r| async move {
            client.pre_vote(r).await
        });
        match reply.await {
            Ok(PreVoteReply { refused }) => Ok(refused.is_none()),
            Err(status) if status.code() == tonic::Code::Unimplemented => Ok(true),
            Err(status) => Err(status.message().to_string()),
        }
    }

    /// One pre-vote round: true if a majority of every configuration would vote for this branch.
    async fn pre_vote(&self, standing: &Standing, timeout: Duration) -> bool {
        let me = self.inner.id;
        let request = PreVoteRequest {
            candidate: me,
            last_log_id: standing.last_log_id,
        };
        let others: BTreeSet<NodeId> = standing
            .configs
            .iter()
            .flatten()
            .copied()
            .filter(|id| *id != me)
            .collect();
        let answers = futures::future::join_all(others.iter().map(|&target| {
            let request = &request;
            async move { (target, self.ask_pre_vote(target, request, timeout).await) }
        }))
        .await;
        let mut granted = BTreeSet::from([me]);
        for (target, answer) in answers {
            match answer {
                Ok(true) => {
                    granted.insert(target);
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(branch = me, peer = target, error = %e, "pre-vote unanswered"),
            }
        }
        quorum(&standing.configs, &granted)
    }
}

/// The leader lease of openraft's vote handler: `election_timeout_max`.
fn lease(timing: &RaftTiming) -> Duration {
    Duration::from_millis(timing.election_timeout_max_ms)
}

/// A random election timeout in [min, max), drawn anew for every attempt (openraft draws one per
/// process, so two voters that once split a vote would keep colliding).
fn random_timeout(timing: &RaftTiming) -> Duration {
    let (min, max) = (timing.election_timeout_min_ms, timing.election_timeout_max_ms);
    Duration::from_millis(min + random_below(max.saturating_sub(min)))
}

/// A voter's election timer (every branch runs it; it acts only while the branch votes): when
/// an election is due ([`election_due`]) and a pre-vote round finds a majority, it triggers
/// openraft's election; either way the next attempt waits for a new random timeout.
pub(super) async fn campaign(branch: Branch, timing: RaftTiming, stop: CancellationToken) {
    let lease = lease(&timing);
    // Often enough that an election starts within a fraction of the timeout of being due.
    let tick = Duration::from_millis((timing.heartbeat_ms / 2).max(10));
    let metrics = branch.raft().metrics();
    let hand_off = branch.inner.hand_off.clone();
    hand_off.set_campaigning(true);
    let mut timeout = random_timeout(&timing);
    let mut not_before = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(tick) => {}
            // A stopping leader asked this branch to take over (the `handoff` module).
            _ = hand_off.asked() => {}
        }
        // Cheap checks first: learners (most branches) and the leader never go further.
        let leader = {
            let m = metrics.borrow();
            if m.state == ServerState::Leader
                || !m.membership_config.membership().voter_ids().any(|id| id == branch.id())
            {
                continue;
            }
            m.current_leader
        };
        let now = Instant::now();
        let urgency = hand_off.urgency(now, leader);
        if urgency == Urgency::None && now < not_before {
            continue;
        }
        let Some(standing) = branch.standing().await else {
            break;
        };
        if urgency == Urgency::None && !election_due(&standing, now, lease, timeout) {
            continue;
        }
        let elect = if urgency == Urgency::Elect {
            true
        } else {
            let won = branch.pre_vote(&standing, timeout).await;
            crate::metrics::record_pre_vote(branch.id(), won);
            won
        };
        if elect {
            if urgency == Urgency::Elect {
                tracing::info!(
                    branch = branch.id(),
                    "asked by the stopping leader: starting an election"
                );
            } else {
                tracing::info!(branch = branch.id(), "pre-vote won: starting an election");
            }
            if branch.raft().trigger().elect().await.is_err() {
                break;
            }
        } else if urgency == Urgency::None {
            tracing::info!(
                branch = branch.id(),
                "no leader heard from, but no majority would elect this branch: not campaigning"
            );
        }
        // Asked by the leader: try again at the next tick while the request holds.
        timeout = random_timeout(&timing);
        not_before = Instant::now() + timeout;
    }
    hand_off.set_campaigning(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    const LEASE: Duration = Duration::from_millis(2000);
    const TIMEOUT: Duration = Duration::from_millis(1500);

    fn log(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    fn follower(updated: Instant) -> Standing {
        Standing {
            leads: false,
            votes: true,
            vote_committed: true,
            vote_updated: Some(updated),
            last_log_id: log(2, 10),
            configs: vec![vec![1, 2, 3]],
            withholding: false,
        }
    }

    /// A voter that started empty and has not caught up: no vote, pre-vote or campaign for a
    /// log that may hold writes; all of them in the cluster's formation.
    #[tokio::test(start_paused = true)]
    async fn a_voter_that_lost_its_data_takes_part_only_in_the_formation() {
        let later = Instant::now() + LEASE * 2;
        let empty = Standing {
            vote_committed: false,
            vote_updated: None,
            last_log_id: None,
            withholding: true,
            ..follower(Instant::now())
        };
        for candidate in [log(1, 1), log(3, 50)] {
            assert_eq!(refusal(&empty, candidate.as_ref(), later, LEASE), Some(WITHHELD));
        }
        let formation = Some(LogId::new(CommittedLeaderId::new(0, 0), 0));
        assert_eq!(refusal(&empty, formation.as_ref(), later, LEASE), None);
        // Its own campaign: not with a partial log, yes with only the initial membership.
        let partial = Standing {
            last_log_id: log(2, 4),
            ..empty.clone()
        };
        assert!(!election_due(&partial, later, LEASE, TIMEOUT));
        let initialized = Standing {
            last_log_id: formation,
            ..empty.clone()
        };
        assert!(election_due(&initialized, later, LEASE, TIMEOUT));
        // Caught up, the same voter is an ordinary one.
        let caught_up = Standing {
            withholding: false,
            ..partial
        };
        assert_eq!(refusal(&caught_up, log(2, 4).as_ref(), later, LEASE), None);
        assert!(election_due(&caught_up, later, LEASE, TIMEOUT));
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_that_hears_its_leader_refuses() {
        let now = Instant::now();
        let standing = follower(now);
        assert!(refusal(&standing, log(2, 10).as_ref(), now + LEASE, LEASE).is_some());
        assert_eq!(
            refusal(
                &standing,
                log(2, 10).as_ref(),
                now + LEASE + Duration::from_millis(1),
                LEASE
            ),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_always_refuses() {
        let now = Instant::now();
        let standing = Standing {
            leads: true,
            ..follower(now)
        };
        assert_eq!(
            refusal(&standing, log(9, 99).as_ref(), now + LEASE * 10, LEASE),
            Some("this branch leads")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_candidate_with_a_shorter_or_older_log_is_refused() {
        let later = Instant::now() + LEASE * 2;
        let standing = follower(Instant::now());
        for behind in [log(2, 9), log(1, 50), None] {
            assert!(
                refusal(&standing, behind.as_ref(), later, LEASE).is_some(),
                "{behind:?}"
            );
        }
        for ahead in [log(2, 10), log(2, 11), log(3, 1)] {
            assert_eq!(refusal(&standing, ahead.as_ref(), later, LEASE), None, "{ahead:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_uncommitted_vote_grants_regardless_of_time() {
        let now = Instant::now();
        let standing = Standing {
            vote_committed: false,
            ..follower(now)
        };
        assert_eq!(refusal(&standing, log(2, 10).as_ref(), now, LEASE), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_election_is_due_after_the_lease_and_the_timeout() {
        let now = Instant::now();
        let standing = follower(now);
        assert!(!election_due(
            &standing,
            now + LEASE + TIMEOUT - Duration::from_millis(1),
            LEASE,
            TIMEOUT
        ));
        assert!(election_due(&standing, now + LEASE + TIMEOUT, LEASE, TIMEOUT));
        // A candidate whose election failed (its vote is not committed) tries again after the
        // timeout alone; leaders and non-voters never.
        let candidate = Standing {
            vote_committed: false,
            ..follower(now)
        };
        assert!(election_due(&candidate, now + TIMEOUT, LEASE, TIMEOUT));
        let leader = Standing {
            leads: true,
            ..follower(now)
        };
        let learner = Standing {
            votes: false,
            ..follower(now)
        };
        for standing in [leader, learner] {
            assert!(!election_due(&standing, now + LEASE * 10, LEASE, TIMEOUT));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_only_voter_campaigns_at_once() {
        let now = Instant::now();
        let alone = Standing {
            configs: vec![vec![1]],
            ..follower(now)
        };
        assert!(election_due(&alone, now, LEASE, TIMEOUT));
    }

    #[test]
    fn a_quorum_needs_a_majority_of_every_configuration() {
        let granted = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<_>>();
        let one = vec![vec![1, 2, 3]];
        assert!(!quorum(&one, &granted(&[1])));
        assert!(quorum(&one, &granted(&[1, 3])));
        let five = vec![vec![1, 2, 3, 4, 5]];
        assert!(!quorum(&five, &granted(&[1, 2])));
        assert!(quorum(&five, &granted(&[1, 2, 5])));
        let joint = vec![vec![1, 2, 3], vec![3, 4, 5]];
        assert!(!quorum(&joint, &granted(&[1, 2, 3])));
        assert!(quorum(&joint, &granted(&[1, 3, 4])));
        assert!(!quorum(&[], &granted(&[1])));
    }
}
