//! Leadership hand-off when the leader stops (Raft thesis §3.10, "TimeoutNow").
//!
//! openraft 0.9 has no leadership transfer. Without one, a leader that stops (a rolling
//! update, a node drain) leaves the voters to notice its silence: they wait out the leader
//! lease (2T) and a random election timeout before campaigning, 3-4 s without writes or reads
//! with the default timing. So a leader that shuts down cleanly hands the leadership over
//! first:
//!
//! 1. it stops proposing (writes forwarded to it meanwhile are answered "not the leader" and
//!    retried by their senders) and stops answering reads from its lease: the target is about
//!    to campaign out of turn, which the lease's reasoning does not allow for (reads still
//!    work, each confirmed by a quorum round);
//! 2. it waits until a voter holds its whole log, and asks that voter to campaign now
//!    (`TimeoutNow` on the peer API);
//! 3. the voter starts an election at once, without pre-vote (the leader itself asked), and
//!    wins it with its own vote and the old leader's (which its vote handler grants once the
//!    leader has led for longer than its lease, or once it has stepped down on seeing the
//!    candidate's higher term) and, with five voters, a follower's once its lease from the
//!    old leader has run out; until the window ends it retries each tick behind a pre-vote;
//! 4. the old leader waits until the new leader has reached it (its vote may still be
//!    needed until then), then stops; it gives up early once the voter it asked answers with
//!    an error (it is stopping too, as when a whole StatefulSet is deleted).
//!
//! Nothing here decides who wins: votes and terms stay openraft's, so a failed hand-off
//! costs only what a stop without one costs. Branches started together in one process
//! (`distbank run`, `distbank server`) stop together and skip it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::{LogId, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, RwLock};
use tokio::time::Instant;

use super::Branch;
use crate::replication::{NodeId, RaftTiming};

/// A leader about to stop asks a voter to campaign now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimeoutNowRequest {
    pub leader: NodeId,
    pub term: u64,
    /// The leader's last log entry: the voter must hold it to win the old leader's vote.
    pub last_log_id: Option<LogId<NodeId>>,
}

/// The answer; `refused`: why not (`None`: the voter campaigns now).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimeoutNowReply {
    pub refused: Option<String>,
}

/// How a hand-off ended, for the shutdown log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandOff {
    /// This branch did not lead: nothing to hand over.
    NotLeader,
    /// This branch is the only voter.
    NoOtherVoter,
    /// `to` leads now (normally the voter asked to campaign).
    Moved { to: NodeId, after: Duration },
    /// The voters elect a leader after the election timeout, as without a hand-off.
    Failed(String),
}

/// A branch's side of hand-offs: its own proposals (stopped when it hands off) and the
/// campaign a leader asked of it.
pub(crate) struct HandOffState {
    proposals_stopped: AtomicBool,
    /// Held shared by each proposal in flight; the hand-off takes it exclusively to wait for
    /// them all.
    in_flight: RwLock<()>,
    /// The leader that asked this branch to campaign, and until when the request holds.
    asked: Mutex<Option<Asked>>,
    wake: Notify,
    /// Whether this branch's election timer runs (not while it starts or stops).
    campaigning: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct Asked {
    by: NodeId,
    until: Instant,
    /// The first attempt goes without a pre-vote: the old leader would refuse one.
    attempted: bool,
}

/// What the election timer should do about a leader's request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Urgency {
    /// Nothing asked: the normal timer.
    None,
    /// Campaign now, without a pre-vote.
    Elect,
    /// Campaign now if a pre-vote finds a majority.
    PreVote,
}

impl HandOffState {
    pub(crate) fn new() -> HandOffState {
        HandOffState {
            proposals_stopped: AtomicBool::new(false),
            in_flight: RwLock::new(()),
            asked: Mutex::new(None),
            wake: Notify::new(),
            campaigning: AtomicBool::new(false),
        }
    }

    /// Runs a leader's proposal unless a hand-off stopped them (`None`: not the leader).
    pub(crate) async fn propose<F: Future>(&self, proposal: F) -> Option<F::Output> {
        if self.proposals_stopped.load(Ordering::Acquire) {
            return None;
        }
        let _in_flight = self.in_flight.read().await;
        if self.proposals_stopped.load(Ordering::Acquire) {
            return None;
        }
        Some(proposal.await)
    }

    /// Whether a hand-off has begun: no more proposals, no more lease reads.
    pub(crate) fn handing_off(&self) -> bool {
        self.proposals_stopped.load(Ordering::Acquire)
    }

    /// Stops proposals; resolves once every proposal in flight has its answer.
    async fn stop_proposals(&self) {
        self.proposals_stopped.store(true, Ordering::Release);
        drop(self.in_flight.write().await);
    }

    /// The election timer runs (`true`) or has stopped; a branch whose timer does not run
    /// refuses to be asked.
    pub(crate) fn set_campaigning(&self, running: bool) {
        self.campaigning.store(running, Ordering::Release);
    }

    /// Whether the election timer runs: false while the branch starts or stops.
    pub(crate) fn campaigning(&self) -> bool {
        self.campaigning.load(Ordering::Acquire)
    }

    /// Resolves when a leader asks this branch to campaign.
    pub(crate) async fn asked(&self) {
        self.wake.notified().await;
    }

    /// What the election timer should do now; `leader` is who this branch sees leading.
    /// A request ends at its deadline, or once someone other than the asker leads.
    pub(crate) fn urgency(&self, now: Instant, leader: Option<NodeId>) -> Urgency {
        let mut asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
        let Some(request) = asked.as_mut() else {
            return Urgency::None;
        };
        if now >= request.until || leader.is_some_and(|leader| leader != request.by) {
            *asked = None;
            return Urgency::None;
        }
        if request.attempted {
            Urgency::PreVote
        } else {
            request.attempted = true;
            Urgency::Elect
        }
    }

    fn ask(&self, by: NodeId, until: Instant) {
        *self.asked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Asked {
            by,
            until,
            attempted: false,
        });
        self.wake.notify_one();
    }
}

/// Rounds of asking every caught-up voter before giving up: a refusal can be a moment early
/// (a voter that has not yet heard this term), but voters that stop too keep refusing.
const ASK_ROUNDS: u32 = 3;

/// How long one `TimeoutNow` may take: a voter that does not answer is passed over.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a leader that handed over asks its target again while no new leader has reached
/// it: a refusal means the target is campaigning (its term moved on), an error that it stops.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// How long a voter keeps campaigning after a leader asked, and how long that leader waits
/// for the leadership to move: the lease plus the longest election timeout, by when the
/// voters would have elected someone without being asked.
pub(crate) fn window(timing: &RaftTiming) -> Duration {
    Duration::from_millis(timing.election_timeout_max_ms.saturating_mul(2))
}

impl Branch {
    /// Hands the leadership to another voter (the module docs); call once, while stopping.
    pub(crate) async fn hand_off_leadership(&self) -> HandOff {
        let me = self.inner.id;
        let started = Instant::now();
        let deadline = started + window(&self.inner.timing);
        let metrics = self.inner.raft.metrics();
        let (leads, term, voters) = {
            let m = metrics.borrow();
            let voters: Vec<NodeId> = m
                .membership_config
                .membership()
                .voter_ids()
                .filter(|id| *id != me)
                .collect();
            (m.state == ServerState::Leader, m.current_term, voters)
        };
        if !leads {
            return HandOff::NotLeader;
        }
        if voters.is_empty() {
            return HandOff::NoOtherVoter;
        }
        let state = &self.inner.hand_off;
        if tokio::time::timeout_at(deadline, state.stop_proposals()).await.is_err() {
            return HandOff::Failed("writes in flight did not finish in time".into());
        }
        let request = TimeoutNowRequest {
            leader: me,
            term,
            last_log_id: self.inner.log.last_log_id(),
        };
        let target = match self.ask_to_campaign(&request, &voters, deadline).await {
            Ok(target) => target,
            Err(why) => return HandOff::Failed(why),
        };
        // This branch steps down when it grants the target its vote, or when it meets the
        // target's higher term on its next AppendEntries; it hears of the new leader from the
        // new leader itself.
        let mut server = self.inner.raft.server_metrics();
        let new_leader = async {
            let leader = server.wait_for(|m| m.current_leader.is_some_and(|leader| leader != me));
            leader.await.map(|m| m.current_leader)
        };
        tokio::pin!(new_leader);
        // The target may stop too (a whole StatefulSet deleted at once): asked again now and
        // then, it answers with an error once it is stopping or gone, and waiting on is useless.
        let mut probe = tokio::time::interval_at(Instant::now() + PROBE_INTERVAL, PROBE_INTERVAL);
        loop {
            tokio::select! {
                moved = &mut new_leader => return match moved {
                    Ok(leader) => HandOff::Moved {
                        to: leader.unwrap_or(target),
                        after: started.elapsed(),
                    },
                    Err(_) => HandOff::Failed("Raft stopped during the hand-off".into()),
                },
                _ = tokio::time::sleep_until(deadline) => return HandOff::Failed(format!(
                    "branch {target} campaigned, but no new leader reached this branch within {:?}",
                    started.elapsed()
                )),
                _ = probe.tick() => {
                    if let Err(e) = self.send_timeout_now(target, &request, deadline).await {
                        return HandOff::Failed(format!(
                            "branch {target} campaigned, then stopped answering after {:?}: {e}",
                            started.elapsed()
                        ));
                    }
                }
            }
        }
    }

    /// Asks a voter holding the whole log (the leader's `last_log_id`) to campaign, each in
    /// turn, until one accepts; `Err`: the last reason none did, after [`ASK_ROUNDS`] rounds
    /// of refusals (voters that are stopping too, or gone) or at `deadline`.
    async fn ask_to_campaign(
        &self,
        request: &TimeoutNowRequest,
        voters: &[NodeId],
        deadline: Instant,
    ) -> Result<NodeId, String> {
        let last = request.last_log_id.map(|id| id.index);
        let mut metrics = self.inner.raft.metrics();
        let mut last_reason = "no voter has the whole log yet".to_string();
        let retry = Duration::from_millis(self.inner.timing.heartbeat_ms.clamp(10, 100));
        let mut rounds = 0;
        loop {
            let caught_up: Vec<NodeId> = {
                let m = metrics.borrow_and_update();
                if m.state != ServerState::Leader {
                    return Err("this branch stopped leading before a voter took over".into());
                }
                let matched = m.replication.as_ref();
                voters
                    .iter()
                    .copied()
                    .filter(|id| {
                        matched
                            .and_then(|replication| replication.get(id))
                            .is_some_and(|matched| matched.map(|id| id.index) >= last)
                    })
                    .collect()
            };
            if !caught_up.is_empty() {
                rounds += 1;
            }
            for target in caught_up {
                match self.send_timeout_now(target, request, deadline).await {
                    Ok(None) => return Ok(target),
                    Ok(Some(refused)) => last_reason = format!("branch {target}: {refused}"),
                    Err(e) => last_reason = format!("branch {target}: {e}"),
                }
            }
            if rounds >= ASK_ROUNDS {
                return Err(last_reason);
            }
            let next = (Instant::now() + retry).min(deadline);
            let _ = tokio::time::timeout_at(next, metrics.changed()).await;
            if Instant::now() >= deadline {
                return Err(last_reason);
            }
        }
    }

    /// One `TimeoutNow` call: `Ok(None)` accepted, `Ok(Some(why))` refused.
    async fn send_timeout_now(
        &self,
        target: NodeId,
        request: &TimeoutNowRequest,
        deadline: Instant,
    ) -> Result<Option<String>, String> {
        let timeout = deadline.saturating_duration_since(Instant::now()).min(ASK_TIMEOUT);
        let reply = super::payload_call(self, target, request, timeout, |mut client, r| async move {
            client.timeout_now(r).await
        });
        let reply: TimeoutNowReply = reply.await.map_err(|status| status.message().to_string())?;
        Ok(reply.refused)
    }

    /// The peer service's `TimeoutNow`: campaign now if this branch votes, follows the asking
    /// leader in its term, and holds its whole log. `Err` while this branch starts or stops
    /// (its election timer does not run): answered as an error rather than a refusal, so a
    /// leader waiting for this branch to take over stops waiting.
    pub(crate) async fn answer_timeout_now(
        &self,
        request: &TimeoutNowRequest,
    ) -> Result<TimeoutNowReply, &'static str> {
        if !self.inner.hand_off.campaigning() {
            return Err("this branch is starting or stopping");
        }
        let refused = self.timeout_now_refusal(request).await;
        match &refused {
            None => {
                tracing::info!(
                    branch = self.inner.id,
                    leader = request.leader,
                    "the leader is stopping and hands over: campaigning now"
                );
                let until = Instant::now() + window(&self.inner.timing);
                self.inner.hand_off.ask(request.leader, until);
            }
            Some(why) => tracing::info!(
                branch = self.inner.id,
                leader = request.leader,
                refused = %why,
                "not taking over from the stopping leader"
            ),
        }
        Ok(TimeoutNowReply { refused })
    }

    async fn timeout_now_refusal(&self, request: &TimeoutNowRequest) -> Option<String> {
        let (leader, term) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow();
            (m.current_leader, m.current_term)
        };
        if leader != Some(request.leader) || term != request.term {
            return Some(format!(
                "this branch does not follow branch {} in term {}",
                request.leader, request.term
            ));
        }
        let Some(standing) = self.standing().await else {
            return Some("Raft has stopped on this branch".into());
        };
        if !standing.votes {
            return Some("this branch does not vote".into());
        }
        if standing.withholding {
            return Some(super::election::WITHHELD.into());
        }
        if standing.last_log_id < request.last_log_id {
            return Some("this branch's log is behind the leader's".into());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_elects_once_then_pre_votes_until_it_ends() {
        let state = HandOffState::new();
        let now = Instant::now();
        assert_eq!(state.urgency(now, Some(1)), Urgency::None);
        state.ask(1, now + Duration::from_secs(4));
        assert_eq!(state.urgency(now, Some(1)), Urgency::Elect);
        assert_eq!(state.urgency(now, None), Urgency::PreVote);
        assert_eq!(state.urgency(now + Duration::from_secs(4), None), Urgency::None);
        // Ended for good, not only at that instant.
        assert_eq!(state.urgency(now, None), Urgency::None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_ends_once_another_branch_leads() {
        let state = HandOffState::new();
        let now = Instant::now();
        state.ask(1, now + Duration::from_secs(4));
        assert_eq!(state.urgency(now, Some(3)), Urgency::None);
        assert_eq!(state.urgency(now, Some(1)), Urgency::None);
    }

    #[tokio::test]
    async fn stopping_proposals_waits_for_those_in_flight_and_refuses_new_ones() {
        let state = std::sync::Arc::new(HandOffState::new());
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (entered, inside) = tokio::sync::oneshot::channel::<()>();
        let in_flight = tokio::spawn({
            let state = state.clone();
            async move {
                state
                    .propose(async move {
                        let _ = entered.send(());
                        let _ = released.await;
                        7
                    })
                    .await
            }
        });
        inside.await.expect("the proposal started");
        let stop = tokio::spawn({
            let state = state.clone();
            async move { state.stop_proposals().await }
        });
        // New proposals are refused at once, while the one in flight still runs.
        while !state.handing_off() {
            tokio::task::yield_now().await;
        }
        assert_eq!(state.propose(async { 8 }).await, None);
        assert!(!stop.is_finished());
        release.send(()).expect("release");
        assert_eq!(in_flight.await.expect("proposal"), Some(7));
        stop.await.expect("stopped");
    }
}
