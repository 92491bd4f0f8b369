//! Query answers made durable. A query is a read, not a log entry, and the answer a branch
//! gives to a query with an event id is kept in that branch's memory, so a retry or a re-run
//! gets the same answer. A standalone branch also records each answer in the replicated log
//! (`Command::RecordQuery`), shortly after giving it and in batches (one entry for all the
//! answers of a moment): a branch restarted from its data directory, or brought back empty
//! and caught up, then answers a re-run of the replay exactly as before, and so does any
//! other branch the query is retried on. The first recorded answer wins.
//!
//! The customer does not wait for the record: an answer given just before a crash (within
//! [`RECORD_DELAY`] plus one commit) may be forgotten, as all answers were before; a clean
//! stop records what is pending before it leaves.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Branch;
use crate::account::{Command, Outcome};

/// How long answers wait to share one log entry.
pub(crate) const RECORD_DELAY: Duration = Duration::from_millis(50);

/// How long a failed record waits before it is tried again (no leader, say).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Answers not yet in the replicated log; `None` when this branch does not record them.
pub(crate) struct QueryRecords {
    pending: Option<Mutex<Vec<(u64, u64)>>>,
    added: Notify,
}

impl QueryRecords {
    pub(crate) fn new(enabled: bool) -> QueryRecords {
        QueryRecords {
            pending: enabled.then(|| Mutex::new(Vec::new())),
            added: Notify::new(),
        }
    }

    /// The answer `balance` was given to the query `event_id`, for the first time here.
    pub(crate) fn add(&self, event_id: u64, balance: u64) {
        if let Some(pending) = &self.pending {
            pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((event_id, balance));
            self.added.notify_one();
        }
    }

    fn take(&self) -> Vec<(u64, u64)> {
        match &self.pending {
            Some(pending) => std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner())),
            None => Vec::new(),
        }
    }

    fn put_back(&self, answers: Vec<(u64, u64)>) {
        if let Some(pending) = &self.pending {
            pending.lock().unwrap_or_else(|p| p.into_inner()).extend(answers);
        }
    }
}

impl Branch {
    /// Records answers as they are given, until `stop` (a standalone branch runs this beside
    /// its listeners; what is pending at the stop goes with [`Branch::record_pending_answers`]).
    pub(crate) async fn record_query_answers(&self, stop: CancellationToken) {
        let records = &self.inner.query_records;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = records.added.notified() => {}
            }
            // Answers given meanwhile share the entry.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RECORD_DELAY) => {}
            }
            let answers = records.take();
            let deadline = Instant::now() + self.inner.request_timeout;
            // A stop abandons the attempt (with no leader it would wait out the whole request
            // timeout) and leaves the answers to the stop's own, shorter attempt. Any that were
            // committed meanwhile are proposed again there, harmlessly: the first record wins.
            let failed = tokio::select! {
                failed = self.record(&answers, deadline) => failed,
                _ = stop.cancelled() => {
                    records.put_back(answers);
                    return;
                }
            };
            let retry = !failed.is_empty();
            records.put_back(failed);
            if retry {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_AFTER) => records.added.notify_one(),
                }
            }
        }
    }

    /// Proposes every pending answer by `deadline`; returns how many could not be recorded
    /// (they stay pending).
    pub(crate) async fn record_pending_answers(&self, deadline: Instant) -> usize {
        let answers = self.inner.query_records.take();
        let failed = self.record(&answers, deadline).await;
        let count = failed.len();
        self.inner.query_records.put_back(failed);
        count
    }

    /// Proposes `answers` (through the leader, in as few entries as group commit makes);
    /// returns the ones not recorded by `deadline`.
    async fn record(&self, answers: &[(u64, u64)], deadline: Instant) -> Vec<(u64, u64)> {
        let results = futures::future::join_all(
            answers
                .iter()
                .map(|&(event_id, balance)| self.submit(Command::RecordQuery { event_id, balance }, deadline)),
        )
        .await;
        let mut failed = Vec::new();
        for (&answer, result) in answers.iter().zip(results) {
            match result {
                // Recorded, or the id already has a result (an earlier answer, or a write
                // under the same id, which its customer was told about): nothing to keep.
                Ok(committed) => debug_assert!(matches!(
                    committed.outcome,
                    Outcome::Balance(_) | Outcome::EventIdReused { .. }
                )),
                Err(e) => {
                    tracing::debug!(branch = self.inner.id, event_id = answer.0, error = %e, "query answer not recorded yet");
                    failed.push(answer);
                }
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_branch_that_does_not_record_keeps_nothing() {
        let records = QueryRecords::new(false);
        records.add(1, 100);
        assert!(records.take().is_empty());
    }

    #[test]
    fn answers_are_taken_once_and_failures_come_back() {
        let records = QueryRecords::new(true);
        records.add(1, 100);
        records.add(2, 150);
        let taken = records.take();
        assert_eq!(taken, vec![(1, 100), (2, 150)]);
        assert!(records.take().is_empty());
        records.put_back(vec![(2, 150)]);
        assert_eq!(records.take(), vec![(2, 150)]);
    }
}
