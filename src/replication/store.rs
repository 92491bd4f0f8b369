//! Raft log and state machine (openraft storage v2), in memory or backed by a data directory.
//!
//! Both keep their working state in memory. With a data directory ([`Storage::open`]) every
//! change to the log store is also appended to the directory's log file, synced before openraft
//! is told it is stored, and every snapshot is written to disk before openraft may purge the
//! log it covers; a restarted branch rebuilds the log from the file and the state machine from
//! the snapshot, and openraft re-applies the committed entries after it. Without one (local
//! clusters, `distbank run`) a restarted branch rejoins empty and is brought up to date by the
//! leader. File format and damage handling: [`super::disk`].

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::disk::{DataDir, LogState as LogData, Record, SnapshotStore, StoreError};
use super::{NodeId, TypeConfig, codec};
use crate::account::{Account, Applied, Command, Outcome};
use crate::telemetry;

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical
/// section here leaves the data consistent, so the value is still valid.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A branch's storage: the log store and the state machine openraft is started with.
#[derive(Debug)]
pub struct Storage {
    pub log: LogStore,
    pub state: StateMachine,
}

impl Storage {
    /// Storage that lives and dies with the process.
    pub fn in_memory(node_id: NodeId, initial_balance: u64) -> Storage {
        Storage {
            log: LogStore::default(),
            state: StateMachine::new(node_id, initial_balance),
        }
    }

    /// Opens (or creates) branch `node_id`'s data directory and recovers what it holds.
    /// Blocking file I/O: call it at start-up.
    pub fn open(dir: &Path, node_id: NodeId, initial_balance: u64) -> Result<Storage, StoreError> {
        let (data, recovered) = DataDir::open(dir, node_id)?;
        let snapshots = data.snapshot_store(recovered.snapshot.as_ref().and_then(|(meta, _)| meta.last_log_id));
        let mut machine = MachineData {
            state: MachineState {
                account: Account::new(initial_balance),
                ..Default::default()
            },
            snapshot: None,
            snapshot_seq: 0,
        };
        if let Some((meta, bytes)) = recovered.snapshot {
            machine.state = codec::decode_stored(&bytes).map_err(|e| StoreError::Corrupt {
                path: snapshots.path().to_path_buf(),
                offset: 0,
                reason: format!("undecodable state-machine state: {e}"),
            })?;
            machine.snapshot = Some(StoredSnapshot { meta, data: bytes });
        }
        let log = &recovered.log;
        tracing::info!(
            dir = %dir.display(),
            vote = ?log.vote,
            entries = log.entries.len(),
            last_index = log.entries.keys().next_back(),
            committed = log.committed.map(|id| id.index),
            snapshot_index = machine.state.last_applied.map(|id| id.index),
            torn_tail_bytes = recovered.torn.map(|torn| torn.bytes),
            "recovered consensus state from the data directory"
        );
        Ok(Storage {
            log: LogStore {
                inner: Arc::new(Mutex::new(recovered.log)),
                disk: Some(Arc::new(Mutex::new(data))),
            },
            state: StateMachine {
                id: node_id,
                applied: Arc::new(watch::channel(machine.state.last_applied).0),
                inner: Arc::new(Mutex::new(machine)),
                snapshots: Some(snapshots),
            },
        })
    }
}

/// The Raft log. Cheap to clone: clones share the same log (openraft reads through a clone).
#[derive(Debug, Clone, Default)]
pub struct LogStore {
    inner: Arc<Mutex<LogData>>,
    /// The data directory, when the log is durable.
    disk: Option<Arc<Mutex<DataDir>>>,
}

impl LogStore {
    /// The id of the last entry in the log (or of the last purged one when it is empty).
    pub fn last_log_id(&self) -> Option<LogId<NodeId>> {
        let log = lock(&self.inner);
        log.entries
            .values()
            .next_back()
            .map(|entry| entry.log_id)
            .or(log.last_purged)
    }

    /// Records `record` on disk (synced when `sync`) and then in memory. File I/O runs on
    /// tokio's blocking pool so a slow fsync does not stall other tasks.
    async fn change(&self, record: Record, sync: bool) -> Result<(), StoreError> {
        if let Some(disk) = &self.disk {
            let disk = disk.clone();
            let inner = self.inner.clone();
            let compact = matches!(record, Record::Purge(_));
            let copy = record.clone();
            run_blocking(move || {
                let mut disk = lock(&disk);
                disk.append(std::slice::from_ref(&copy), sync)?;
                if compact && disk.wants_compaction() {
                    let mut log = lock(&inner);
                    log.apply(copy);
                    return disk.compact(&log);
                }
                Ok(())
            })
            .await?;
        }
        lock(&self.inner).apply(record);
        Ok(())
    }
}

async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            path: Default::default(),
            action: "finish a storage task",
            source: std::io::Error::other(e.to_string()),
        })
    })
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let log = lock(&self.inner);
        Ok(log.entries.range(range).map(|(_, entry)| entry.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let log = lock(&self.inner);
        let last = log.entries.values().next_back().map(|entry| entry.log_id);
        Ok(LogState {
            last_purged_log_id: log.last_purged,
            last_log_id: last.or(log.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.change(Record::Vote(*vote), true)
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).vote)
    }

    /// Not synced on its own: the committed index only saves work at start-up (a branch that
    /// lost it learns it again from the leader); the next synced record makes it durable.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        self.change(Record::Committed(committed), false)
            .await
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        self.change(Record::Entries(entries), true)
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        // Synced (or, in memory, stored): openraft may now count this branch's copy.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.change(Record::Truncate { from: log_id.index }, true)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.change(Record::Purge(log_id), true)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// What the state machine holds: the account and Raft's bookkeeping of what it has applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MachineState {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    account: Account,
}

#[derive(Debug)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

#[derive(Debug)]
struct MachineData {
    state: MachineState,
    snapshot: Option<StoredSnapshot>,
    snapshot_seq: u64,
}

/// The replicated account as a Raft state machine. Cheap to clone; clones share state, so the
/// branch keeps one to answer reads from the local replica.
#[derive(Debug, Clone)]
pub struct StateMachine {
    /// The branch this replica belongs to (for its apply spans).
    id: NodeId,
    inner: Arc<Mutex<MachineData>>,
    /// The last applied entry, for requests waiting on it (and, on a leader, for the commit it
    /// attaches to learners' entries: [`super::piggyback`]). openraft's own wait API wakes every
    /// waiter on every metrics change and clones the whole metrics struct for each; under load
    /// that cost more than the writes.
    applied: Arc<watch::Sender<Option<LogId<NodeId>>>>,
    /// Where snapshots are persisted, when the branch has a data directory.
    snapshots: Option<SnapshotStore>,
}

impl StateMachine {
    pub fn new(id: NodeId, initial_balance: u64) -> StateMachine {
        StateMachine {
            id,
            inner: Arc::new(Mutex::new(MachineData {
                state: MachineState {
                    account: Account::new(initial_balance),
                    ..Default::default()
                },
                snapshot: None,
                snapshot_seq: 0,
            })),
            applied: Arc::new(watch::channel(None).0),
            snapshots: None,
        }
    }

    /// Waits until this replica has applied the entry at `index` (no timeout of its own).
    pub async fn wait_applied(&self, index: u64) {
        let mut applied = self.applied.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we wait.
        let _ = applied
            .wait_for(|applied| applied.map(|id| id.index) >= Some(index))
            .await;
    }

    /// Publishes the applied index `data` holds to the waiters, after releasing the lock.
    fn publish_applied(&self, data: MutexGuard<'_, MachineData>) {
        let last = data.state.last_applied;
        drop(data);
        self.applied.send_if_modified(|applied| {
            let changed = *applied != last;
            *applied = last;
            changed
        });
    }

    /// Writes a snapshot to the data directory (if any) before openraft relies on it.
    async fn persist(
        &self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        data: &[u8],
    ) -> Result<(), StorageError<NodeId>> {
        let Some(store) = self.snapshots.clone() else {
            return Ok(());
        };
        let (meta, data) = (meta.clone(), data.to_vec());
        let signature = meta.signature();
        run_blocking(move || store.save(&meta, &data))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(signature), &e).into())
    }

    /// The local replica's balance right now (not by itself linearizable: see `branch`).
    pub fn balance(&self) -> u64 {
        lock(&self.inner).state.account.balance()
    }

    /// The local replica's answer to a read.
    pub fn query(&self) -> Outcome {
        lock(&self.inner).state.account.query()
    }

    /// The operation recorded under `event_id` on this replica.
    pub fn recorded_operation(&self, event_id: u64) -> Option<crate::account::Operation> {
        lock(&self.inner).state.account.recorded_operation(event_id)
    }

    /// The answer recorded for the query `event_id` on this replica.
    pub fn recorded_query(&self, event_id: u64) -> Option<u64> {
        lock(&self.inner).state.account.recorded_query(event_id)
    }

    /// How many event ids the idempotency table holds.
    pub fn recorded_events(&self) -> usize {
        lock(&self.inner).state.account.recorded_events()
    }

    /// Index of the last entry this replica has applied (what [`Self::wait_applied`] waits on).
    pub fn last_applied_index(&self) -> Option<u64> {
        self.applied.borrow().map(|id| id.index)
    }

    /// The last entry this replica has applied.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        *self.applied.borrow()
    }

    /// Whether `id` is a learner (a non-voting member) in the membership this replica applied.
    pub fn is_learner(&self, id: NodeId) -> bool {
        lock(&self.inner)
            .state
            .membership
            .membership()
            .learner_ids()
            .any(|learner| learner == id)
    }
}

/// The span of one replica applying one customer write: a child of the request that wrote it.
fn apply_span(branch: NodeId, index: u64, command: &Command, traceparent: &str) -> tracing::Span {
    let (name, operation, amount) = match command {
        Command::PropagateDeposit { amount, .. } => ("apply PropagateDeposit", "PropagateDeposit", *amount),
        Command::PropagateWithdraw { amount, .. } => ("apply PropagateWithdraw", "PropagateWithdraw", *amount),
        Command::RecordQuery { balance, .. } => ("apply RecordQuery", "RecordQuery", *balance),
    };
    let span = tracing::info_span!(
        "apply",
        otel.name = name,
        branch.id = branch,
        event.id = command.event_id(),
        operation,
        amount,
        log.index = index,
        result = tracing::field::Empty,
        balance = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    telemetry::set_parent_from_traceparent(&span, traceparent);
    span
}

/// The result as a span attribute / metric label.
pub fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Success | Outcome::Balance(_) => "success",
        Outcome::Fail => "fail",
        Outcome::EventIdReused { .. } => "event_id_reused",
    }
}

/// A snapshot of the state right now. The state is copied under the lock (a memcpy-like clone,
/// about a millisecond for a full event-id table) and encoded outside it (tens of
/// milliseconds), so applying entries and answering reads do not stall while it is built.
#[allow(clippy::result_large_err)] // openraft's StorageError is what the storage traits return
fn snapshot_of(inner: &Mutex<MachineData>) -> Result<StoredSnapshot, StorageError<NodeId>> {
    let (state, snapshot_seq) = {
        let mut data = lock(inner);
        data.snapshot_seq += 1;
        (data.state.clone(), data.snapshot_seq)
    };
    let bytes = codec::encode(&state).map_err(|e| StorageIOError::read_state_machine(&e))?;
    let snapshot_id = match state.last_applied {
        Some(last) => format!("{}-{}-{}", last.leader_id, last.index, snapshot_seq),
        None => format!("--{snapshot_seq}"),
    };
    Ok(StoredSnapshot {
        meta: SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership,
            snapshot_id,
        },
        data: bytes,
    })
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let snapshot = snapshot_of(&self.inner)?;
        // On disk before openraft sees it: it purges the log the snapshot covers right after.
        self.persist(&snapshot.meta, &snapshot.data).await?;
        let result = Snapshot {
            meta: snapshot.meta.clone(),
            snapshot: Box::new(Cursor::new(snapshot.data.clone())),
        };
        let mut data = lock(&self.inner);
        if data.snapshot.as_ref().map(|s| s.meta.last_log_id) <= Some(snapshot.meta.last_log_id) {
            data.snapshot = Some(snapshot);
        }
        Ok(result)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let data = lock(&self.inner);
        Ok((data.state.last_applied, data.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Applied>>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut data = lock(&self.inner);
        let mut results = Vec::new();
        for entry in entries {
            data.state.last_applied = Some(entry.log_id);
            let applied = match entry.payload {
                EntryPayload::Normal(proposal) => proposal
                    .writes
                    .iter()
                    .map(|write| {
                        // Only writes made under a sampled trace carry a traceparent.
                        let span = match &write.traceparent {
                            Some(traceparent) if telemetry::enabled() => {
                                apply_span(self.id, entry.log_id.index, &write.command, traceparent)
                            }
                            _ => tracing::Span::none(),
                        };
                        let applied = data.state.account.apply(&write.command);
                        if !span.is_none() {
                            span.record("result", outcome_label(applied.outcome));
                            span.record("balance", applied.balance);
                        }
                        applied
                    })
                    .collect(),
                EntryPayload::Membership(membership) => {
                    data.state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Vec::new()
                }
                // openraft wants exactly one response per entry, blank ones included.
                EntryPayload::Blank => Vec::new(),
            };
            results.push(applied);
        }
        self.publish_applied(data);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let state: MachineState =
            codec::decode_stored(&bytes).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        self.persist(meta, &bytes).await?;
        // Rare and worth seeing: this replica was behind what the leader's log still holds.
        tracing::info!(
            branch = self.id,
            snapshot_index = meta.last_log_id.map(|id| id.index),
            bytes = bytes.len(),
            "installed the leader's snapshot"
        );
        let mut data = lock(&self.inner);
        data.state = state;
        data.snapshot = Some(StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        });
        self.publish_applied(data);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let data = lock(&self.inner);
        Ok(data.snapshot.as_ref().map(|snapshot| Snapshot {
            meta: snapshot.meta.clone(),
            snapshot: Box::new(Cursor::new(snapshot.data.clone())),
        }))
    }
}
