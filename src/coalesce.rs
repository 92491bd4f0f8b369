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
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Round<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Shares rounds of an operation among the callers waiting for it (see the module docs).
pub struct Coalescer<T> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    round: Box<dyn Fn() -> Round<T> + Send + Sync>,
    state: Mutex<State<T>>,
}

struct State<T> {
    in_flight: bool,
    /// Callers that arrived while a round was in flight: they share the next one.
    waiting: Vec<oneshot::Sender<T>>,
}

impl<T: Clone + Send + 'static> Coalescer<T> {
    pub fn new<F>(round: F) -> Self
    where
        F: Fn() -> Round<T> + Send + Sync + 'static,
    {
        Self {
            shared: Arc::new(Shared {
                round: Box::new(round),
                state: Mutex::new(State {
                    in_flight: false,
                    waiting: Vec::new(),
                }),
            }),
        }
    }

    /// The result of a round that begins after this call. A caller that finds no round in
    /// flight runs one itself (no hand-off: a lone reader pays nothing extra). `None` only if
    /// the round was abandoned without a result.
    pub async fn run(&self) -> Option<T> {
        let waiter = {
            let mut state = self.shared.lock();
            if state.in_flight {
                let (reply, answer) = oneshot::channel();
                state.waiting.push(reply);
                Some(answer)
            } else {
                state.in_flight = true;
                None
            }
        };
        match waiter {
            Some(answer) => answer.await.ok(),
            None => {
                // The guard hands over to the waiters even if this caller is cancelled mid-round.
                let _guard = RoundDone(self.shared.clone());
                Some((self.shared.round)().await)
            }
        }
    }
}

impl<T> Shared<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Ends a round: callers that arrived during it get a fresh round (on a task of its own, so the
/// caller that ran this one is answered now), or the coalescer goes idle.
struct RoundDone<T: Clone + Send + 'static>(Arc<Shared<T>>);

impl<T: Clone + Send + 'static> Drop for RoundDone<T> {
    fn drop(&mut self) {
        let batch = {
            let mut state = self.0.lock();
            state.waiting.retain(|caller| !caller.is_closed());
            if state.waiting.is_empty() {
                state.in_flight = false;
                return;
            }
            std::mem::take(&mut state.waiting)
        };
        let shared = self.0.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (process exit): nobody can be waiting for an answer any more.
            return;
        };
        runtime.spawn(async move {
            let _guard = RoundDone(shared.clone());
            let result = (shared.round)().await;
            for caller in batch {
                let _ = caller.send(result.clone());
            }
        });
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

    #[tokio::test(flavor = "current_thread")]
    async fn a_caller_cancelled_mid_round_does_not_strand_the_others() {
        let (coalescer, started, began, release) = gated_rounds();
        let coalescer = Arc::new(coalescer);
        let first = tokio::spawn({
            let c = coalescer.clone();
            async move { c.run().await }
        });
        began.notified().await; // round 1 runs inside the first caller
        let waiting = tokio::spawn({
            let c = coalescer.clone();
            async move { c.run().await }
        });
        tokio::task::yield_now().await;
        first.abort(); // the caller running round 1 goes away
        let _ = first.await;
        began.notified().await; // the waiter still gets a round of its own
        release.notify_one();
        assert_eq!(waiting.await.expect("task"), Some(2));
        // And the coalescer is idle again: the next caller runs round 3 itself.
        let next = tokio::spawn({
            let c = coalescer.clone();
            async move { c.run().await }
        });
        began.notified().await;
        release.notify_one();
        assert_eq!(next.await.expect("task"), Some(3));
        assert_eq!(started.load(Ordering::SeqCst), 3);
    }
}
