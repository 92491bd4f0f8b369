//! The leader's read lease: how long the leader may answer a read-index request without first
//! confirming its leadership with a quorum round.
//!
//! Openraft 0.9 already makes followers honour a lease: a voter that accepted AppendEntries
//! from the leader at time `t` refuses every vote request until `t + election_timeout_max`
//! (and a restarted voter treats its start as such a `t`, so a crash does not shorten it). So
//! when a quorum of voters acknowledged AppendEntries that the leader *sent* at `t`, no other
//! leader can be elected before `t + election_timeout_max`, and until then the leader's
//! committed index already covers every acknowledged write. Openraft keeps that time to
//! itself (`last_quorum_acked_time` is crate-private), so the leader's network records it here
//! from the replies it sees: every AppendEntries reply that accepted the leader's vote
//! (replication and heartbeats alike) counts, with the time its request was sent.
//!
//! The leader uses a shorter lease than the followers ([`read_lease`]): the margin covers
//! clock-rate differences between hosts. What a lease cannot cover is a clock that stops while
//! time goes on (a whole VM suspended between the check and the answer); `--read-mode quorum`
//! turns leases off for such environments.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use openraft::Vote;
use tokio::time::Instant;

use super::NodeId;

/// The lease a leader grants itself, from the followers' (`election_timeout_max`).
pub fn read_lease(election_timeout_max: Duration) -> Duration {
    election_timeout_max * 3 / 4
}

/// When each voter last acknowledged the leader's vote, as the leader's network saw it.
/// The default grants no leases.
#[derive(Debug, Default)]
pub struct LeaseClock {
    duration: Duration,
    acks: Mutex<Acks>,
}

#[derive(Debug, Default)]
struct Acks {
    /// The vote the times below acknowledge; a newer vote starts afresh.
    vote: Option<Vote<NodeId>>,
    /// Per peer: the send time of the latest request whose reply accepted `vote`.
    sent: HashMap<NodeId, Instant>,
}

impl LeaseClock {
    /// A clock granting leases of `duration` (see [`read_lease`]); zero turns leases off.
    pub fn new(duration: Duration) -> LeaseClock {
        LeaseClock {
            duration,
            acks: Mutex::default(),
        }
    }

    /// Whether leases are on (a zero duration turns them off).
    pub fn grants(&self) -> bool {
        !self.duration.is_zero()
    }

    /// `peer` accepted `vote` in its reply to a request sent at `sent`.
    pub fn acknowledged(&self, peer: NodeId, vote: &Vote<NodeId>, sent: Instant) {
        if !self.grants() || !vote.is_committed() {
            return;
        }
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        match acks.vote {
            Some(current) if current == *vote => {}
            // A reply to an older leadership of this branch, arriving late: it proves nothing
            // about the current one.
            Some(current) if current > *vote => return,
            _ => {
                acks.vote = Some(*vote);
                acks.sent.clear();
            }
        }
        let at = acks.sent.entry(peer).or_insert(sent);
        *at = (*at).max(sent);
    }

    /// Until when `leader` (this branch) holds the lease for `vote`, with `voters` the voter
    /// set (one configuration, not a joint one): the send time that a quorum has acknowledged,
    /// plus the lease. `None` if no quorum has acknowledged `vote`, or leases are off.
    pub fn expiry(&self, vote: &Vote<NodeId>, voters: &BTreeSet<NodeId>, leader: NodeId) -> Option<Instant> {
        if !self.grants() || !voters.contains(&leader) {
            return None;
        }
        // The leader counts for itself: it needs `quorum - 1` others, and the lease runs from
        // the latest time that many of them have all acknowledged.
        let others_needed = voters.len() / 2;
        if others_needed == 0 {
            return Some(Instant::now() + self.duration);
        }
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        if acks.vote != Some(*vote) {
            return None;
        }
        let mut times: Vec<Instant> = voters
            .iter()
            .filter(|id| **id != leader)
            .filter_map(|id| acks.sent.get(id).copied())
            .collect();
        times.sort_unstable_by(|a, b| b.cmp(a));
        times
            .get(others_needed - 1)
            .map(|quorum_time| *quorum_time + self.duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(term: u64, leader: NodeId) -> Vote<NodeId> {
        Vote::new_committed(term, leader)
    }

    fn voters(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    const LEASE: Duration = Duration::from_millis(1500);

    #[tokio::test(start_paused = true)]
    async fn the_lease_runs_from_the_send_time_a_quorum_acknowledged() {
        let clock = LeaseClock::new(LEASE);
        let (v, all) = (vote(3, 1), voters(&[1, 2, 3, 4, 5]));
        let t0 = Instant::now();
        clock.acknowledged(2, &v, t0);
        assert_eq!(clock.expiry(&v, &all, 1), None, "two of five is no quorum");
        clock.acknowledged(3, &v, t0 + Duration::from_millis(10));
        assert_eq!(
            clock.expiry(&v, &all, 1),
            Some(t0 + LEASE),
            "the older of the two counts"
        );
        clock.acknowledged(4, &v, t0 + Duration::from_millis(20));
        assert_eq!(clock.expiry(&v, &all, 1), Some(t0 + Duration::from_millis(10) + LEASE));
        // A late reply to an older request does not move a peer's time back.
        clock.acknowledged(4, &v, t0);
        assert_eq!(clock.expiry(&v, &all, 1), Some(t0 + Duration::from_millis(10) + LEASE));
    }

    #[tokio::test(start_paused = true)]
    async fn learners_and_other_votes_do_not_count() {
        let clock = LeaseClock::new(LEASE);
        let (v, three) = (vote(3, 1), voters(&[1, 2, 3]));
        let t0 = Instant::now();
        clock.acknowledged(7, &v, t0); // a learner
        assert_eq!(clock.expiry(&v, &three, 1), None);
        clock.acknowledged(2, &vote(2, 1), t0); // an older leadership
        assert_eq!(clock.expiry(&v, &three, 1), None);
        clock.acknowledged(2, &Vote::new(3, 1), t0); // not a committed vote
        assert_eq!(clock.expiry(&v, &three, 1), None);
        clock.acknowledged(2, &v, t0);
        assert_eq!(clock.expiry(&v, &three, 1), Some(t0 + LEASE));
        // A newer vote starts afresh; an older vote's lease is not asked for by a leader.
        let newer = vote(4, 1);
        clock.acknowledged(3, &newer, t0);
        assert_eq!(clock.expiry(&v, &three, 1), None);
        assert_eq!(clock.expiry(&newer, &three, 1), Some(t0 + LEASE));
        clock.acknowledged(2, &v, t0 + Duration::from_millis(5));
        assert_eq!(clock.expiry(&newer, &three, 1), Some(t0 + LEASE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_voter_holds_its_own_lease_and_zero_turns_leases_off() {
        let v = vote(1, 1);
        let now = Instant::now();
        assert_eq!(LeaseClock::new(LEASE).expiry(&v, &voters(&[1]), 1), Some(now + LEASE));
        assert_eq!(
            LeaseClock::new(LEASE).expiry(&v, &voters(&[2, 3, 4]), 1),
            None,
            "not a voter"
        );
        let off = LeaseClock::new(Duration::ZERO);
        off.acknowledged(2, &v, now);
        assert_eq!(off.expiry(&v, &voters(&[1, 2, 3]), 1), None);
        assert_eq!(off.expiry(&v, &voters(&[1]), 1), None);
    }
}
