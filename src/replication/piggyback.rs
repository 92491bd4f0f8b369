//! One message per learner per write.
//!
//! openraft's leader sends a new entry to every member at once and, after it is committed, a
//! second AppendEntries carrying only the new commit index; a replica applies an entry only
//! after that second message. At 50 branches that is ~100 messages (and follower runs) per
//! write, most of a write's cost. Voters must get entries at once, since their acknowledgements
//! make the commit; a learner's acknowledgement counts for nothing. So the leader's network
//! *holds* a learner's new entries until the leader itself has applied them (bounded by a
//! quarter of the call's timeout, after which they go as they are) and sends them with their
//! commit attached. The commit notice openraft sends next carries nothing the learner lacks; it
//! is answered here without a round trip when the same stream delivered the same state moments
//! before. A learner applies a write when it used to: its apply waited for the commit notice.
//! Branches whose log is in memory only (`distbank run`, branches without `--data-dir`) do
//! this; with a data directory a learner fsyncs what it appends, and holding its entries would
//! move that fsync from beside the voters' to after the commit.
//!
//! Why attaching the commit is safe: it is attached only when the leader's last applied entry
//! was written by the very leadership (term and node) that sends the request. That entry is
//! committed, and the request's entries come from the same leader's log, which is append-only
//! for its term; so every entry of the request is in the committed log (Raft's log matching).

use std::time::Duration;

use openraft::LogId;
use openraft::raft::AppendEntriesRequest;
use tokio::time::Instant;

use super::store::StateMachine;
use super::{NodeId, TypeConfig};

/// The leader side: its own replica, whose applied entries are committed.
#[derive(Debug, Clone)]
pub struct Piggyback {
    replica: StateMachine,
    /// Whether learners' entries are held for their commit (logs in memory only).
    attach: bool,
}

impl Piggyback {
    /// `attach`: hold learners' new entries and attach their commit. Without it the replica
    /// only tells which peers are learners (for [`super::demand`]).
    pub fn new(replica: StateMachine, attach: bool) -> Piggyback {
        Piggyback { replica, attach }
    }

    /// Whether learners get their entries with the commit attached.
    pub fn attaches(&self) -> bool {
        self.attach
    }

    /// Whether `target` is a learner in the membership this replica applied. Members it has
    /// not applied yet count as voters (never held): at start-up the voters are in no applied
    /// membership. A learner promoted by a membership change not yet applied here would be
    /// held, at worst, for the bounded wait.
    pub fn is_learner(&self, target: NodeId) -> bool {
        self.replica.is_learner(target)
    }

    /// Holds `request` (new entries for a learner) until this replica has applied its last
    /// entry or `hold` has passed, then attaches the commit it may carry.
    pub async fn attach_commit(&self, request: &mut AppendEntriesRequest<TypeConfig>, hold: Duration) {
        if !self.attach {
            return;
        }
        let Some(last) = request.entries.last().map(|entry| entry.log_id) else {
            return;
        };
        if self.replica.last_applied_index() < Some(last.index) {
            // Not applied in time: the entries go without their commit, as openraft sent them.
            let _ = tokio::time::timeout(hold, self.replica.wait_applied(last.index)).await;
        }
        if let Some(commit) = commit_to_attach(request, self.replica.last_applied()) {
            request.leader_commit = Some(commit);
        }
    }
}

/// The commit `request` may carry given the leader's last applied entry: its own last entry,
/// when that is known committed by the rule in the module docs and ahead of what it carries.
pub fn commit_to_attach(
    request: &AppendEntriesRequest<TypeConfig>,
    leader_applied: Option<LogId<NodeId>>,
) -> Option<LogId<NodeId>> {
    let last = request.entries.last()?.log_id;
    let applied = leader_applied?;
    let same_leadership = applied.leader_id == request.vote.leader_id && request.vote.committed;
    (same_leadership && applied.index >= last.index && request.leader_commit < Some(last)).then_some(last)
}

/// What one learner last acknowledged on this connection.
#[derive(Debug, Default)]
pub struct LearnerLink {
    delivered: Option<Delivered>,
}

#[derive(Debug)]
struct Delivered {
    vote: openraft::Vote<NodeId>,
    /// The learner's last entry after the request: the request's last, or its `prev_log_id`.
    accepted: Option<LogId<NodeId>>,
    commit: Option<LogId<NodeId>>,
    at: Instant,
}

impl LearnerLink {
    /// Whether `request` would tell the learner nothing new: no entries, the same leader, the
    /// learner's log ending where it ends, a commit no later than the one it has, and that
    /// acknowledged within `window` (so the periodic heartbeats still reach the learner).
    pub fn redundant(&self, request: &AppendEntriesRequest<TypeConfig>, window: Duration) -> bool {
        let Some(delivered) = &self.delivered else {
            return false;
        };
        request.entries.is_empty()
            && delivered.vote == request.vote
            && delivered.accepted == request.prev_log_id
            && request.leader_commit <= delivered.commit
            && delivered.at.elapsed() < window
    }

    /// Records the outcome of sending `request`: `acknowledged` when the learner answered
    /// Success. Anything else forgets what it had, so the next request is sent.
    pub fn record(&mut self, request: &AppendEntriesRequest<TypeConfig>, acknowledged: bool) {
        self.delivered = acknowledged.then(|| Delivered {
            vote: request.vote,
            accepted: request.entries.last().map(|entry| entry.log_id).or(request.prev_log_id),
            commit: request.leader_commit,
            at: Instant::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, Vote};

    use super::*;

    fn log_id(term: u64, node: NodeId, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    /// Leader 1 of term 2 sends entries 5..=6 after entry 4, with commit at 4.
    fn request() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(log_id(2, 1, 4)),
            entries: (5..=6)
                .map(|index| Entry {
                    log_id: log_id(2, 1, index),
                    payload: EntryPayload::Blank,
                })
                .collect(),
            leader_commit: Some(log_id(2, 1, 4)),
        }
    }

    #[test]
    fn commit_is_attached_once_the_same_leadership_applied_the_last_entry() {
        let request = request();
        assert_eq!(commit_to_attach(&request, Some(log_id(2, 1, 6))), Some(log_id(2, 1, 6)));
        assert_eq!(commit_to_attach(&request, Some(log_id(2, 1, 9))), Some(log_id(2, 1, 6)));
    }

    #[test]
    fn no_commit_before_the_last_entry_is_applied() {
        let request = request();
        assert_eq!(commit_to_attach(&request, Some(log_id(2, 1, 5))), None);
        assert_eq!(commit_to_attach(&request, None), None);
    }

    #[test]
    fn no_commit_from_an_entry_of_another_leadership() {
        // Applied up to 9, but written by another leader (or another term): the request's
        // entries may have been replaced in the committed log.
        let request = request();
        assert_eq!(commit_to_attach(&request, Some(log_id(3, 2, 9))), None);
        assert_eq!(commit_to_attach(&request, Some(log_id(2, 2, 9))), None);
        assert_eq!(commit_to_attach(&request, Some(log_id(1, 1, 9))), None);
        let mut uncommitted_vote = request;
        uncommitted_vote.vote = Vote::new(2, 1);
        assert_eq!(commit_to_attach(&uncommitted_vote, Some(log_id(2, 1, 9))), None);
    }

    #[test]
    fn heartbeats_carry_no_attached_commit() {
        let mut heartbeat = request();
        heartbeat.entries.clear();
        assert_eq!(commit_to_attach(&heartbeat, Some(log_id(2, 1, 9))), None);
    }

    fn commit_notice(commit: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(log_id(2, 1, 6)),
            entries: Vec::new(),
            leader_commit: Some(log_id(2, 1, commit)),
        }
    }

    #[test]
    fn the_commit_notice_after_delivered_entries_is_redundant() {
        let window = Duration::from_secs(60);
        let mut sent = request();
        sent.leader_commit = Some(log_id(2, 1, 6));
        let mut link = LearnerLink::default();
        assert!(!link.redundant(&commit_notice(6), window), "nothing delivered yet");
        link.record(&sent, true);
        assert!(link.redundant(&commit_notice(6), window));
        assert!(link.redundant(&commit_notice(5), window));
        assert!(!link.redundant(&commit_notice(7), window), "a later commit is news");
        let mut other_leader = commit_notice(6);
        other_leader.vote = Vote::new_committed(3, 2);
        assert!(!link.redundant(&other_leader, window));
        let mut further = commit_notice(6);
        further.prev_log_id = Some(log_id(2, 1, 7));
        assert!(!link.redundant(&further, window), "the learner's log ends elsewhere");
        assert!(!link.redundant(&sent, window), "requests with entries always go");
        assert!(!link.redundant(&commit_notice(6), Duration::ZERO), "outside the window");
    }

    #[test]
    fn a_failed_delivery_makes_nothing_redundant() {
        let mut sent = request();
        sent.leader_commit = Some(log_id(2, 1, 6));
        let mut link = LearnerLink::default();
        link.record(&sent, true);
        link.record(&sent, false);
        assert!(!link.redundant(&commit_notice(6), Duration::from_secs(60)));
    }
}
