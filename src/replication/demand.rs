//! Learners nobody is waiting on get their entries in batches.
//!
//! A learner's acknowledgement counts for nothing in Raft: only the branch a customer is talking to
//! needs a new entry at once (its customer's next query waits for that replica to apply everything
//! up to a read index). With many branches, sending every write to every learner as it happens is
//! most of a write's cost: at 50 branches 47 of the 49 messages a sequential write causes go to
//! learners whose customers are idle. openraft keeps one request in flight per peer and puts
//! everything appended meanwhile into the next one; so once an *idle* learner has acknowledged new
//! entries, the leader's network holds that answer for up to a short linger, and the entries
//! written meanwhile then go in one request: an idle learner gets one message per linger however
//! many writes happen.
//!
//! A learner is *wanted* from the moment it forwards a write or asks for a read index
//! ([`Demand::want`], which also ends a hold at once) until it has been sent what that request
//! waits for: entries and commit up to the write's log index or the read index
//! ([`Waiting::until`]). Nothing is held while it is wanted; once it has what it asked for, it
//! is idle again at once, so at any time only the learners with a customer request in flight
//! get every write as it happens.
//!
//! Holding a message is a network delay, which Raft tolerates by design: nothing here changes
//! what is committed or applied, only when an idle replica hears of it (within the linger).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::NodeId;

/// How long the answer from an idle learner may be held while more entries gather for it.
pub const LINGER: Duration = Duration::from_millis(50);

/// How long every learner stays wanted after a request from a peer that did not say who it is
/// (an older release), or after [`Demand::want`] with `None`.
pub const GRACE: Duration = Duration::from_millis(20);

/// What one learner waits for.
#[derive(Debug, Clone, Copy, Default)]
struct Need {
    /// Requests from it in flight on the leader, whose index is not known yet.
    open: usize,
    /// Entries and commit it needs up to this index (the highest its requests were answered
    /// with).
    upto: u64,
    /// When every learner was last wanted at once.
    everyone: Option<Instant>,
}

/// Which learners have a customer waiting, as the leader learns it from their requests.
#[derive(Debug, Default)]
pub struct Demand {
    wanted: Mutex<HashMap<NodeId, Arc<watch::Sender<Need>>>>,
}

impl Demand {
    fn learner(&self, branch: NodeId) -> Arc<watch::Sender<Need>> {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        wanted
            .entry(branch)
            .or_insert_with(|| Arc::new(watch::Sender::new(Need::default())))
            .clone()
    }

    /// `branch` waits for the leader (a forwarded write or a read index) until the returned
    /// [`Waiting`] says up to which index, or is dropped. `None`: a peer that does not say who
    /// it is (an older release), so every learner counts as wanted for [`GRACE`].
    pub fn want(&self, branch: Option<NodeId>) -> Waiting {
        match branch {
            Some(branch) => {
                let learner = self.learner(branch);
                learner.send_modify(|need| need.open += 1);
                Waiting { learner: Some(learner) }
            }
            None => {
                let now = Some(Instant::now());
                let wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
                wanted
                    .values()
                    .for_each(|learner| learner.send_modify(|need| need.everyone = now));
                Waiting { learner: None }
            }
        }
    }

    /// The leader's side of one learner: whether its next request may linger.
    pub fn watch(&self, branch: NodeId) -> Wanted {
        Wanted {
            need: self.learner(branch).subscribe(),
        }
    }
}

/// One request of a learner in flight on the leader.
#[derive(Debug)]
#[must_use = "dropping it at once ends the request's demand"]
pub struct Waiting {
    learner: Option<Arc<watch::Sender<Need>>>,
}

impl Waiting {
    /// The request was answered: the learner needs entries and commit up to `index`.
    pub fn until(mut self, index: u64) {
        if let Some(learner) = self.learner.take() {
            learner.send_modify(|need| {
                need.open = need.open.saturating_sub(1);
                need.upto = need.upto.max(index);
            });
        }
    }
}

impl Drop for Waiting {
    /// A request that ended without an answer (refused, cancelled) needs nothing more.
    fn drop(&mut self) {
        if let Some(learner) = self.learner.take() {
            learner.send_modify(|need| need.open = need.open.saturating_sub(1));
        }
    }
}

/// What one learner waits for, seen from the leader's connection to it.
#[derive(Debug)]
pub struct Wanted {
    need: watch::Receiver<Need>,
}

impl Wanted {
    /// Waits after this learner acknowledged entries and commit up to `sent`: not at all while
    /// it is wanted (a request of it is open, or it still lacks what one was answered with),
    /// else until `linger` has passed or it becomes wanted.
    pub async fn linger(&mut self, sent: u64, linger: Duration, grace: Duration) {
        let need = *self.need.borrow_and_update();
        if need.open > 0 || need.upto > sent || need.everyone.is_some_and(|at| at.elapsed() < grace) {
            return;
        }
        // A closed channel (the leader's branch is stopping) ends the wait at once.
        let _ = tokio::time::timeout(linger, self.need.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lingers(wanted: &mut Wanted, sent: u64) -> Duration {
        let start = Instant::now();
        wanted.linger(sent, LINGER, GRACE).await;
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_learner_waits_the_linger() {
        let demand = Demand::default();
        let mut wanted = demand.watch(7);
        assert_eq!(lingers(&mut wanted, 0).await, LINGER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_learner_is_wanted_until_it_has_what_its_request_was_answered_with() {
        let demand = Demand::default();
        let mut wanted = demand.watch(7);
        let waiting = demand.want(Some(7));
        assert_eq!(lingers(&mut wanted, 5).await, Duration::ZERO, "a request is open");
        waiting.until(9);
        assert_eq!(lingers(&mut wanted, 5).await, Duration::ZERO, "it still lacks 6 to 9");
        assert_eq!(lingers(&mut wanted, 9).await, LINGER, "it has what it asked for: idle");
        // Two requests at once: wanted until both are answered and served.
        let (first, second) = (demand.want(Some(7)), demand.want(Some(7)));
        first.until(10);
        assert_eq!(lingers(&mut wanted, 10).await, Duration::ZERO, "the second is open");
        second.until(12);
        assert_eq!(lingers(&mut wanted, 11).await, Duration::ZERO);
        assert_eq!(lingers(&mut wanted, 12).await, LINGER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_ends_unanswered_wants_nothing_more() {
        let demand = Demand::default();
        let mut wanted = demand.watch(7);
        drop(demand.want(Some(7)));
        assert_eq!(lingers(&mut wanted, 0).await, LINGER);
    }

    #[tokio::test(start_paused = true)]
    async fn becoming_wanted_ends_a_linger() {
        let demand = Arc::new(Demand::default());
        let mut wanted = demand.watch(7);
        let other = demand.clone();
        let requests = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let theirs = other.want(Some(8));
            tokio::time::sleep(Duration::from_millis(1)).await;
            (theirs, other.want(Some(7)))
        });
        assert_eq!(
            lingers(&mut wanted, 0).await,
            Duration::from_millis(4),
            "another learner's demand is not ours"
        );
        drop(requests.await);
    }

    #[tokio::test(start_paused = true)]
    async fn an_anonymous_request_wants_every_learner_for_the_grace_period() {
        let demand = Demand::default();
        let mut first = demand.watch(7);
        let mut second = demand.watch(8);
        demand.want(None).until(0);
        assert_eq!(lingers(&mut first, 0).await, Duration::ZERO);
        assert_eq!(lingers(&mut second, 0).await, Duration::ZERO);
        tokio::time::advance(GRACE).await;
        assert_eq!(lingers(&mut first, 0).await, LINGER);
    }
}
