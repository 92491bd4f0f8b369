//! Group commit: writes that arrive together travel together.
//!
//! Every Raft entry costs the leader one log append (an fsync with a data directory) and one
//! AppendEntries call per peer; every write a follower forwards costs one `Submit` call. Under
//! concurrent load those per-call costs, not the work inside them, bound throughput (a leader
//! that replicates each write on its own to 4 peers saturates near 8-10k writes/s on two
//! cores). [`Batcher`] collects the items submitted while earlier batches are in flight and
//! hands them to its flush function together: many customers' writes become one log entry, and
//! one forwarded `Submit` carries every write a follower has waiting.
//!
//! A lone caller never waits for company: when fewer than `max_in_flight` batches are running,
//! its item starts a batch at once. Batches form only from items that would otherwise queue
//! behind a busy pipeline, so sequential latency is unchanged.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Flush<O> = Pin<Box<dyn Future<Output = Vec<O>> + Send>>;

/// Collects concurrently submitted items into batches (see the module docs).
pub struct Batcher<I, O> {
    shared: Arc<Shared<I, O>>,
}

struct Shared<I, O> {
    /// Handles one batch and returns one result per item, in order.
    flush: Box<dyn Fn(Vec<I>) -> Flush<O> + Send + Sync>,
    max_in_flight: usize,
    max_batch: usize,
    state: Mutex<State<I, O>>,
}

struct State<I, O> {
    in_flight: usize,
    queued: Vec<(I, oneshot::Sender<O>)>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// `max_in_flight` batches may run at once, each of at most `max_batch` items (both ≥ 1).
    pub fn new<F>(max_in_flight: usize, max_batch: usize, flush: F) -> Self
    where
        F: Fn(Vec<I>) -> Flush<O> + Send + Sync + 'static,
    {
        Batcher {
            shared: Arc::new(Shared {
                flush: Box::new(flush),
                max_in_flight: max_in_flight.max(1),
                max_batch: max_batch.max(1),
                state: Mutex::new(State {
                    in_flight: 0,
                    queued: Vec::new(),
                }),
            }),
        }
    }

    /// Submits one item and waits for its result. `None` if its batch ended without a result
    /// for it (the flush returned too few results, or the runtime is shutting down).
    pub async fn submit(&self, item: I) -> Option<O> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut state = self.shared.lock();
            state.queued.push((item, reply));
            if state.in_flight < self.shared.max_in_flight {
                state.in_flight += 1;
                true
            } else {
                false
            }
        };
        if start {
            // The batch runs on a task of its own: a caller that gives up (a deadline, a
            // dropped request) must not take the other callers' items down with it.
            Shared::spawn_next(self.shared.clone());
        }
        answer.await.ok()
    }
}

impl<I: Send + 'static, O: Send + 'static> Shared<I, O> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<I, O>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs batches on one task until nothing is queued (this task holds one in-flight slot).
    fn spawn_next(shared: Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (process exit): the callers' receivers see their senders dropped.
            shared.lock().queued.clear();
            return;
        };
        runtime.spawn(async move {
            loop {
                let batch = {
                    let mut state = shared.lock();
                    // Callers that gave up no longer need their items written.
                    state.queued.retain(|(_, reply)| !reply.is_closed());
                    if state.queued.is_empty() {
                        state.in_flight -= 1;
                        return;
                    }
                    let take = state.queued.len().min(shared.max_batch);
                    state.queued.drain(..take).collect::<Vec<_>>()
                };
                let (items, replies): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.into_iter().unzip();
                let results = (shared.flush)(items).await;
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    type Sizes = Arc<Mutex<Vec<usize>>>;

    /// A batcher whose flushes record their sizes and wait until the test releases them.
    fn gated(max_in_flight: usize, max_batch: usize) -> (Arc<Batcher<u32, u32>>, Sizes, Arc<Notify>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(Notify::new());
        let (s, r) = (sizes.clone(), release.clone());
        let batcher = Batcher::new(max_in_flight, max_batch, move |items: Vec<u32>| {
            let (s, r) = (s.clone(), r.clone());
            Box::pin(async move {
                s.lock().expect("sizes").push(items.len());
                r.notified().await;
                items.into_iter().map(|item| item * 10).collect()
            }) as Flush<u32>
        });
        (Arc::new(batcher), sizes, release)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_item_starts_at_once_and_later_items_share_the_next_batch() {
        let (batcher, sizes, release) = gated(1, 100);
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.submit(1).await }
        });
        settle().await;
        assert_eq!(*sizes.lock().expect("sizes"), vec![1], "the first item did not wait");
        let later: Vec<_> = (2..=9)
            .map(|item| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(item).await })
            })
            .collect();
        settle().await;
        release.notify_one();
        assert_eq!(first.await.expect("task"), Some(10));
        settle().await;
        release.notify_one();
        for (item, caller) in (2..=9).zip(later) {
            assert_eq!(
                caller.await.expect("task"),
                Some(item * 10),
                "each caller gets its own result"
            );
        }
        assert_eq!(
            *sizes.lock().expect("sizes"),
            vec![1, 8],
            "eight queued items, one batch"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn batches_are_capped_and_in_flight_batches_are_limited() {
        let (batcher, sizes, release) = gated(2, 3);
        let callers: Vec<_> = (0..8)
            .map(|item| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(item).await })
            })
            .collect();
        settle().await;
        // Two slots: the first two callers each started a batch with what was queued then.
        let started = sizes.lock().expect("sizes").clone();
        assert_eq!(started.len(), 2, "at most two batches in flight: {started:?}");
        for _ in 0..8 {
            release.notify_one();
            settle().await;
        }
        for (item, caller) in (0..8).zip(callers) {
            assert_eq!(caller.await.expect("task"), Some(item * 10));
        }
        let sizes = sizes.lock().expect("sizes").clone();
        assert_eq!(sizes.iter().sum::<usize>(), 8, "every item flushed once: {sizes:?}");
        assert!(sizes.iter().all(|&n| n <= 3), "no batch above the cap: {sizes:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn callers_that_gave_up_are_not_flushed_and_a_short_result_is_none() {
        let flushed = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let (f, r) = (flushed.clone(), release.clone());
        let batcher = Arc::new(Batcher::new(1, 100, move |items: Vec<u32>| {
            let (f, r) = (f.clone(), r.clone());
            Box::pin(async move {
                f.fetch_add(items.len(), Ordering::SeqCst);
                r.notified().await;
                // One result too few: the last caller must see None, not hang.
                items.iter().skip(1).map(|item| item * 10).collect()
            }) as Flush<u32>
        }));
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.submit(1).await }
        });
        settle().await;
        let abandoned = tokio::spawn({
            let b = batcher.clone();
            async move { b.submit(2).await }
        });
        let kept = tokio::spawn({
            let b = batcher.clone();
            async move { b.submit(3).await }
        });
        settle().await;
        abandoned.abort();
        let _ = abandoned.await;
        release.notify_one();
        assert_eq!(first.await.expect("task"), None, "the flush returned no result for it");
        settle().await;
        release.notify_one();
        assert_eq!(kept.await.expect("task"), None);
        assert_eq!(
            flushed.load(Ordering::SeqCst),
            2,
            "the abandoned item was never flushed"
        );
    }
}
