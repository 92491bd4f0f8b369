//! Read-index batching: many concurrent linearizable reads share one quorum round.
//!
//! A ReadIndex round (the leader confirms it still leads with a heartbeat to the voters, or a
//! follower asks the leader for a read index) costs the same for one reader as for a hundred.
//! [`Coalescer`] runs rounds one after another and answers every caller that arrived *before*
//! the round began with that round's result. Callers that arrive while a round is in flight wait
//! for the next one: a round that began before a caller arrived could name an index older than a
//! write that completed before the caller's read, which would break linearizability.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::{mpsc, oneshot};

type Round<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Shares rounds of an operation among the callers waiting for it (see the module docs).
pub struct Coalescer<T> {
    waiting: mpsc::UnboundedSender<oneshot::Sender<T>>,
}

impl<T: Clone + Send + 'static> Coalescer<T> {
    /// Spawns the task that runs rounds of `round()`; it ends when the coalescer is dropped.
    pub fn new<F>(round: F) -> Self
    where
        F: Fn() -> Round<T> + Send + 'static,
    {
        let (waiting, mut queue) = mpsc::unbounded_channel::<oneshot::Sender<T>>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = queue.recv().await {
                batch.push(first);
                // Everyone queued now arrived before this round starts.
                while let Ok(next) = queue.try_recv() {
                    batch.push(next);
                }
                batch.retain(|caller| !caller.is_closed());
                if batch.is_empty() {
                    continue;
                }
                let result = round().await;
                for caller in batch.drain(..) {
                    let _ = caller.send(result.clone());
                }
            }
        });
        Self { waiting }
    }

    /// The result of the next round that begins after this call. `None` once the task is gone
    /// (runtime shutting down).
    pub async fn run(&self) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.waiting.send(reply).ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::sync::Notify;

    /// A round that starts, then waits until the test lets it finish, returning its number.
    fn gated_rounds() -> (Coalescer<u64>, Arc<AtomicU64>, Arc<Notify>, Arc<Notify>) {
        let started = Arc::new(AtomicU64::new(0));
        let began = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let (s, b, r) = (started.clone(), began.clone(), release.clone());
        let coalescer = Coalescer::new(move || {
            let (s, b, r) = (s.clone(), b.clone(), r.clone());
            Box::pin(async move {
                let number = s.fetch_add(1, Ordering::SeqCst) + 1;
                b.notify_one();
                r.notified().await;
                number
            })
        });
        (coalescer, started, began, release)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn callers_during_a_round_share_the_next_round_not_the_current_one() {
        let (coalescer, started, began, release) = gated_rounds();
        let coalescer = Arc::new(coalescer);
        let first = tokio::spawn({
            let c = coalescer.clone();
            async move { c.run().await }
        });
        began.notified().await; // round 1 is in flight
        let late: Vec<_> = (0..10)
            .map(|_| {
                let c = coalescer.clone();
                tokio::spawn(async move { c.run().await })
            })
            .collect();
        // Single-threaded runtime: yielding lets every late caller run up to its queued wait.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        release.notify_one();
        assert_eq!(first.await.expect("task"), Some(1));
        began.notified().await; // round 2 started for the late callers
        release.notify_one();
        for caller in late {
            assert_eq!(
                caller.await.expect("task"),
                Some(2),
                "late callers must not get round 1"
            );
        }
        assert_eq!(started.load(Ordering::SeqCst), 2, "ten late callers share one round");
    }
}
