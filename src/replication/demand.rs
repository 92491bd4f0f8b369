//! Learners nobody is waiting on get their entries in batches.
//!
//! A learner's acknowledgement counts for nothing in Raft: only the branch a customer is
//! talking to needs a new entry at once (its customer waits for its own replica to apply the
//! write, or for a read index). With many branches, sending every write to every learner as it
//! happens is most of a write's cost: at 50 branches 47 of the 49 messages a sequential write
//! causes go to learners whose customers are idle. openraft keeps one request in flight per
//! peer and puts everything appended meanwhile into the next one; so once an *idle* learner
//! has acknowledged new entries, the leader's network holds that answer for up to a short
//! linger, and the entries written meanwhile then go in one request: an idle learner gets one
//! message per linger however many writes happen. A learner becomes *wanted* the moment it
//! forwards a write or asks for a read index ([`Demand::want`]), which ends a hold at once (so
//! the next request, with everything up to now, goes to it straight away), and stays wanted
//! for a grace period after, during which nothing is held.
//!
//! Holding a message is a network delay, which Raft tolerates by design: nothing here changes
//! what is committed or applied, only when an idle replica hears of it (within the linger).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::NodeId;

/// How long the answer from an idle learner may be held while more entries gather for it.
pub const LINGER: Duration = Duration::from_millis(50);

/// How long a learner stays wanted after its last forwarded write or read-index request:
/// long enough for the entry it waits for to be sent to it without lingering.
pub const GRACE: Duration = Duration::from_millis(20);

/// Which learners have a customer waiting, as the leader learns it from their requests.
#[derive(Debug, Default)]
pub struct Demand {
    wanted: Mutex<HashMap<NodeId, watch::Sender<Option<Instant>>>>,
}

impl Demand {
    /// `branch` waits for the leader (a forwarded write or a read index). `None`: a peer that
    /// does not say who it is (an older release), so every learner counts as wanted.
    pub fn want(&self, branch: Option<NodeId>) {
        let now = Some(Instant::now());
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        match branch {
            Some(branch) => {
                wanted
                    .entry(branch)
                    .or_insert_with(|| watch::Sender::new(None))
                    .send_replace(now);
            }
            None => wanted.values().for_each(|sender| {
                sender.send_replace(now);
            }),
        }
    }

    /// The leader's side of one learner: how long its next request may linger.
    pub fn watch(&self, branch: NodeId) -> Wanted {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        let sender = wanted.entry(branch).or_insert_with(|| watch::Sender::new(None));
        Wanted {
            last: sender.subscribe(),
        }
    }
}

/// When one learner was last wanted.
#[derive(Debug)]
pub struct Wanted {
    last: watch::Receiver<Option<Instant>>,
}

impl Wanted {
    /// Waits after this learner acknowledged new entries: not at all while it is wanted, else
    /// until `linger` has passed or it becomes wanted.
    pub async fn linger(&mut self, linger: Duration, grace: Duration) {
        let last = *self.last.borrow_and_update();
        if last.is_some_and(|at| at.elapsed() < grace) {
            return;
        }
        // A closed channel (the leader's branch is stopping) ends the wait at once.
        let _ = tokio::time::timeout(linger, self.last.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_learner_waits_the_linger() {
        let demand = Demand::default();
        let mut wanted = demand.watch(7);
        let start = Instant::now();
        wanted.linger(LINGER, GRACE).await;
        assert_eq!(start.elapsed(), LINGER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wanted_learner_does_not_wait() {
        let demand = Demand::default();
        let mut wanted = demand.watch(7);
        demand.want(Some(7));
        let start = Instant::now();
        wanted.linger(LINGER, GRACE).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Still wanted within the grace period, idle again after it.
        tokio::time::advance(GRACE / 2).await;
        let start = Instant::now();
        wanted.linger(LINGER, GRACE).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        tokio::time::advance(GRACE).await;
        let start = Instant::now();
        wanted.linger(LINGER, GRACE).await;
        assert_eq!(start.elapsed(), LINGER);
    }

    #[tokio::test(start_paused = true)]
    async fn becoming_wanted_ends_a_linger() {
        let demand = std::sync::Arc::new(Demand::default());
        let mut wanted = demand.watch(7);
        let other = demand.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            other.want(Some(8));
            tokio::time::sleep(Duration::from_millis(1)).await;
            other.want(Some(7));
        });
        let start = Instant::now();
        wanted.linger(LINGER, GRACE).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(4),
            "another learner's demand is not ours"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_anonymous_request_wants_every_learner() {
        let demand = Demand::default();
        let mut first = demand.watch(7);
        let mut second = demand.watch(8);
        demand.want(None);
        let start = Instant::now();
        first.linger(LINGER, GRACE).await;
        second.linger(LINGER, GRACE).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
