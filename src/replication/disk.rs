//! The on-disk form of a branch's consensus state (`distbank branch --data-dir DIR`).
//!
//! A data directory holds three files:
//!
//! - `raft.wal`: an append-only log of `Record`s (vote, log entries, truncations, purges,
//!   committed index), replayed in order at start-up. Every record is framed as
//!   `[payload length: u32][payload CRC32: u32][CRC32 of the previous 8 bytes: u32][payload]`
//!   (little endian; payload = bincode). Vote and log records are fsynced before openraft is
//!   told they are stored, so nothing a branch acknowledged (a vote granted, an entry counted
//!   towards a quorum) is lost in a crash. The committed index is written without a sync of its
//!   own: it is a hint (a branch that forgets it re-learns it from the leader) and becomes
//!   durable with the next synced record. When the log has been purged after a snapshot, the
//!   file is rewritten with only the live state (temporary file, fsync, rename, fsync of the
//!   directory).
//! - `snapshot.bin`: the latest state-machine snapshot (balance, event-id table, membership),
//!   one framed record after a magic number, replaced atomically the same way.
//! - `LOCK`: held with an exclusive file lock while a branch runs, so two processes never share
//!   a data directory.
//!
//! # Damage
//!
//! The only damage a crash can cause is a *torn tail*: the last record of `raft.wal` cut short
//! (or left as zero bytes by the file system) because the process died while writing it. That
//! record was never synced, so it was never acknowledged; it is cut off and the branch logs a
//! warning naming the file, the offset and the byte count. Anything else (a checksum
//! mismatch, a length field that does not match its own checksum, an undecodable payload, a
//! snapshot that does not parse) is corruption: the branch refuses to start with
//! [`StoreError::Corrupt`], naming the file and the byte offset. It never guesses. To recover,
//! move the directory away; the branch then rejoins empty and is brought up to date by the
//! leader: always safe for a learner, and for a voter while the other voters keep running with
//! their data until it has caught up (docs/operations.md).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::{Entry, LogId, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use super::{NodeId, TypeConfig, codec};

/// The log file's name inside the data directory.
pub const WAL_FILE: &str = "raft.wal";
/// The snapshot file's name inside the data directory.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";
const LOCK_FILE: &str = "LOCK";
const SNAPSHOT_MAGIC: &[u8; 8] = b"DBNKSNP1";
/// Version 2: a log entry carries a batch of writes (group commit).
const FORMAT: u32 = 2;
const HEADER_LEN: usize = 12;
/// No legitimate record comes near this (snapshots are stored in their own file).
const MAX_RECORD: usize = 256 * 1024 * 1024;
/// Rewrite the log after a purge once it has grown beyond this.
const COMPACT_AFTER_BYTES: u64 = 8 * 1024 * 1024;

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: corrupt at byte offset {offset}: {reason}; refusing to start (move the data directory away to rejoin empty from the other branches)"
    )]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("{path}: this data belongs to branch {found}, not branch {expected}; check --data-dir and the branch id")]
    WrongBranch {
        path: PathBuf,
        found: NodeId,
        expected: NodeId,
    },
    #[error("{path}: the data directory is in use by another process")]
    Locked { path: PathBuf },
    #[error("cannot encode a record for {path}: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: bincode::error::EncodeError,
    },
}

fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// One change to the log store, in the order it happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Record {
    /// First record of every file: the format and the branch the data belongs to.
    Header {
        format: u32,
        node_id: NodeId,
    },
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
    /// One append batch (one record, so a batch is stored whole or not at all).
    Entries(Vec<Entry<TypeConfig>>),
    /// Entries from this index on were removed (a conflicting suffix).
    Truncate {
        from: u64,
    },
    /// Entries up to and including this id were removed (covered by a snapshot).
    Purge(LogId<NodeId>),
}

/// The log store's state, rebuilt by replaying records.
#[derive(Debug, Default)]
pub(crate) struct LogState {
    pub vote: Option<Vote<NodeId>>,
    pub committed: Option<LogId<NodeId>>,
    pub last_purged: Option<LogId<NodeId>>,
    pub entries: BTreeMap<u64, Entry<TypeConfig>>,
}

impl LogState {
    /// Applies one record (the same code path at run time and at replay, so both agree).
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Header { .. } => {}
            Record::Vote(vote) => self.vote = Some(vote),
            Record::Committed(committed) => self.committed = committed,
            Record::Entries(entries) => {
                for entry in entries {
                    self.entries.insert(entry.log_id.index, entry);
                }
            }
            Record::Truncate { from } => {
                self.entries.split_off(&from);
            }
            Record::Purge(log_id) => {
                self.last_purged = Some(log_id);
                self.entries = self.entries.split_off(&(log_id.index + 1));
            }
        }
    }

    /// The records that recreate this state (what a compacted log holds).
    fn to_records(&self, node_id: NodeId) -> Vec<Record> {
        let mut records = vec![Record::Header {
            format: FORMAT,
            node_id,
        }];
        records.extend(self.vote.map(Record::Vote));
        records.extend(self.last_purged.map(Record::Purge));
        if !self.entries.is_empty() {
            records.push(Record::Entries(self.entries.values().cloned().collect()));
        }
        records.push(Record::Committed(self.committed));
        records
    }
}

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let header_crc = crc32fast::hash(&header[0..8]);
    header[8..12].copy_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
}

fn encode_records(path: &Path, records: &[Record]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    for record in records {
        let payload = codec::encode(record).map_err(|source| StoreError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
        if payload.len() > MAX_RECORD {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                action: "write a record",
                source: std::io::Error::other(format!("record of {} bytes is too large", payload.len())),
            });
        }
        frame(&payload, &mut out);
    }
    Ok(out)
}

/// What reading one framed record found.
#[derive(Debug, PartialEq)]
enum Frame<'a> {
    Complete {
        payload: &'a [u8],
        next: usize,
    },
    /// The bytes from here to the end are an unfinished write (short, or zero-filled).
    Torn,
    Corrupt(String),
}

fn read_frame(bytes: &[u8], offset: usize) -> Frame<'_> {
    let rest = &bytes[offset..];
    if rest.iter().all(|b| *b == 0) {
        return Frame::Torn;
    }
    if rest.len() < HEADER_LEN {
        return Frame::Torn;
    }
    let word = |at: usize| u32::from_le_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
    let (len, payload_crc, header_crc) = (word(0), word(4), word(8));
    if crc32fast::hash(&rest[0..8]) != header_crc {
        return Frame::Corrupt("record header checksum mismatch".into());
    }
    let len = len as usize;
    if len > MAX_RECORD {
        return Frame::Corrupt(format!("record length {len} exceeds the limit {MAX_RECORD}"));
    }
    if rest.len() - HEADER_LEN < len {
        return Frame::Torn;
    }
    let payload = &rest[HEADER_LEN..HEADER_LEN + len];
    let computed = crc32fast::hash(payload);
    if computed != payload_crc {
        return Frame::Corrupt(format!(
            "checksum mismatch in a {len}-byte record (stored {payload_crc:#010x}, computed {computed:#010x})"
        ));
    }
    Frame::Complete {
        payload,
        next: offset + HEADER_LEN + len,
    }
}

/// A torn tail found (and cut off) at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    pub offset: u64,
    pub bytes: u64,
}

/// Replays the records in `bytes`: the state, the length of the valid prefix, and the torn
/// tail if there is one.
fn replay(path: &Path, bytes: &[u8], node_id: NodeId) -> Result<(LogState, usize, Option<TornTail>), StoreError> {
    let corrupt = |offset: usize, reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    let mut state = LogState::default();
    let mut offset = 0;
    while offset < bytes.len() {
        let (payload, next) = match read_frame(bytes, offset) {
            Frame::Complete { payload, next } => (payload, next),
            Frame::Corrupt(reason) => return Err(corrupt(offset, reason)),
            Frame::Torn => {
                let torn = TornTail {
                    offset: offset as u64,
                    bytes: (bytes.len() - offset) as u64,
                };
                return Ok((state, offset, Some(torn)));
            }
        };
        let record: Record =
            codec::decode_stored(payload).map_err(|e| corrupt(offset, format!("undecodable record: {e}")))?;
        match (&record, offset) {
            (Record::Header { format, node_id: found }, 0) => {
                if *format != FORMAT {
                    return Err(corrupt(
                        0,
                        format!("format version {format}, but this distbank reads version {FORMAT} only"),
                    ));
                }
                if *found != node_id {
                    return Err(StoreError::WrongBranch {
                        path: path.to_path_buf(),
                        found: *found,
                        expected: node_id,
                    });
                }
            }
            (_, 0) => return Err(corrupt(0, "the file does not start with a header record".into())),
            (Record::Header { .. }, _) => return Err(corrupt(offset, "a second header record".into())),
            _ => {}
        }
        state.apply(record);
        offset = next;
    }
    Ok((state, offset, None))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "sync the directory"))
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(io(&tmp, "create"))?;
    file.write_all(bytes).map_err(io(&tmp, "write"))?;
    file.sync_all().map_err(io(&tmp, "sync"))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path, "replace"))?;
    sync_dir(dir)
}

/// An open data directory: the lock, the log file, the snapshot file's location.
#[derive(Debug)]
pub struct DataDir {
    dir: PathBuf,
    node_id: NodeId,
    wal_path: PathBuf,
    wal: File,
    wal_len: u64,
    _lock: File,
}

/// What was found in a data directory at start-up.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub log: LogState,
    pub snapshot: Option<(SnapshotMeta<NodeId, openraft::BasicNode>, Vec<u8>)>,
    pub torn: Option<TornTail>,
}

impl DataDir {
    /// Opens (creating if needed) branch `node_id`'s data directory and reads everything in it.
    pub(crate) fn open(dir: &Path, node_id: NodeId) -> Result<(DataDir, Recovered), StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir, "create the data directory"))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path, "open"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path, "lock")(e)),
        }

        let snapshot = read_snapshot(&dir.join(SNAPSHOT_FILE))?;
        let wal_path = dir.join(WAL_FILE);
        let mut wal = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&wal_path)
            .map_err(io(&wal_path, "open"))?;
        let mut bytes = Vec::new();
        wal.read_to_end(&mut bytes).map_err(io(&wal_path, "read"))?;
        let (log, valid, torn) = replay(&wal_path, &bytes, node_id)?;
        let mut data = DataDir {
            dir: dir.to_path_buf(),
            node_id,
            wal_path,
            wal,
            wal_len: valid as u64,
            _lock: lock,
        };
        if let Some(torn) = torn {
            tracing::warn!(
                file = %data.wal_path.display(),
                offset = torn.offset,
                bytes = torn.bytes,
                "cutting off a torn final record (an unfinished, never acknowledged write)"
            );
            data.wal.set_len(valid as u64).map_err(io(&data.wal_path, "truncate"))?;
            data.wal.sync_all().map_err(io(&data.wal_path, "sync"))?;
        }
        if valid == 0 {
            // A new (or never finished) file: start it with the header, durably.
            data.append(
                &[Record::Header {
                    format: FORMAT,
                    node_id,
                }],
                true,
            )?;
            sync_dir(dir)?;
        }
        Ok((data, Recovered { log, snapshot, torn }))
    }

    /// Appends records; with `sync`, returns only once they are on stable storage.
    pub(crate) fn append(&mut self, records: &[Record], sync: bool) -> Result<(), StoreError> {
        use std::io::{Seek as _, SeekFrom};
        let bytes = encode_records(&self.wal_path, records)?;
        // Write at the known end of the valid prefix (not wherever a failed write left off).
        self.wal
            .seek(SeekFrom::Start(self.wal_len))
            .map_err(io(&self.wal_path, "seek"))?;
        self.wal.write_all(&bytes).map_err(io(&self.wal_path, "append"))?;
        if sync {
            self.wal.sync_data().map_err(io(&self.wal_path, "sync"))?;
        }
        self.wal_len += bytes.len() as u64;
        Ok(())
    }

    /// Whether the log file has grown enough to be worth rewriting.
    pub(crate) fn wants_compaction(&self) -> bool {
        self.wal_len > COMPACT_AFTER_BYTES
    }

    /// Replaces the log file with the records that recreate `state`.
    pub(crate) fn compact(&mut self, state: &LogState) -> Result<(), StoreError> {
        let bytes = encode_records(&self.wal_path, &state.to_records(self.node_id))?;
        write_atomic(&self.dir, &self.wal_path, &bytes)?;
        self.wal = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.wal_path)
            .map_err(io(&self.wal_path, "reopen"))?;
        self.wal_len = bytes.len() as u64;
        Ok(())
    }

    /// Where snapshots of this directory are stored; `saved` is the snapshot found at start-up.
    pub(crate) fn snapshot_store(&self, saved: Option<LogId<NodeId>>) -> SnapshotStore {
        SnapshotStore {
            dir: self.dir.clone(),
            path: self.dir.join(SNAPSHOT_FILE),
            saved: Arc::new(Mutex::new(saved)),
        }
    }
}

/// The snapshot file of a data directory. Clones share the record of what was last saved.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotStore {
    dir: PathBuf,
    path: PathBuf,
    /// The newest snapshot's last log id on disk; also serializes writers (openraft builds
    /// snapshots in a task of their own, which can overlap installing one from the leader).
    saved: Arc<Mutex<Option<LogId<NodeId>>>>,
}

impl SnapshotStore {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Stores a snapshot atomically and durably, unless a newer one is already stored.
    pub(crate) fn save(&self, meta: &SnapshotMeta<NodeId, openraft::BasicNode>, data: &[u8]) -> Result<(), StoreError> {
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        if saved.is_some() && *saved > meta.last_log_id {
            return Ok(());
        }
        let payload = codec::encode(&(meta, data)).map_err(|source| StoreError::Encode {
            path: self.path.clone(),
            source,
        })?;
        let mut bytes = SNAPSHOT_MAGIC.to_vec();
        frame(&payload, &mut bytes);
        write_atomic(&self.dir, &self.path, &bytes)?;
        *saved = meta.last_log_id;
        Ok(())
    }
}

type StoredSnapshot = (SnapshotMeta<NodeId, openraft::BasicNode>, Vec<u8>);

/// Reads the snapshot file; it is written atomically, so any damage is corruption.
fn read_snapshot(path: &Path) -> Result<Option<StoredSnapshot>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path, "read")(e)),
    };
    let corrupt = |offset: usize, reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    if !bytes.starts_with(SNAPSHOT_MAGIC) {
        return Err(corrupt(0, "not a distbank snapshot file (bad magic number)".into()));
    }
    let start = SNAPSHOT_MAGIC.len();
    match read_frame(&bytes, start) {
        Frame::Complete { payload, next } if next == bytes.len() => codec::decode_stored(payload)
            .map(Some)
            .map_err(|e| corrupt(start, format!("undecodable snapshot: {e}"))),
        Frame::Complete { next, .. } => Err(corrupt(next, "unexpected bytes after the snapshot".into())),
        Frame::Torn => Err(corrupt(start, "the snapshot is cut short".into())),
        Frame::Corrupt(reason) => Err(corrupt(start, reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(crate::replication::Proposal {
                writes: vec![crate::replication::Proposed {
                    command: crate::account::Command::PropagateDeposit {
                        event_id: Some(index),
                        amount: 10,
                    },
                    traceparent: None,
                }],
            }),
        }
    }

    fn write_some(dir: &Path) {
        let (mut data, recovered) = DataDir::open(dir, 1).expect("open");
        assert!(recovered.log.entries.is_empty());
        data.append(&[Record::Vote(Vote::new(2, 1))], true).expect("vote");
        data.append(&[Record::Entries(vec![entry(1), entry(2)])], true)
            .expect("entries");
        data.append(&[Record::Entries(vec![entry(3)])], true).expect("entries");
    }

    #[test]
    fn a_reopened_directory_has_everything_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_some(dir.path());
        let (_data, recovered) = DataDir::open(dir.path(), 1).expect("reopen");
        assert_eq!(recovered.log.vote, Some(Vote::new(2, 1)));
        assert_eq!(recovered.log.entries.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(recovered.torn, None);
    }

    #[test]
    fn a_short_final_record_is_cut_off_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_some(dir.path());
        let path = dir.path().join(WAL_FILE);
        let len = std::fs::metadata(&path).expect("metadata").len();
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_len(len - 3).expect("cut");
        drop(file);
        let (mut data, recovered) = DataDir::open(dir.path(), 1).expect("reopen");
        let torn = recovered.torn.expect("torn tail reported");
        assert_eq!(torn.offset + torn.bytes, len - 3);
        assert_eq!(recovered.log.entries.keys().copied().collect::<Vec<_>>(), [1, 2]);
        // Appending after the cut yields a clean file again.
        data.append(&[Record::Entries(vec![entry(3)])], true).expect("append");
        drop(data);
        let (_data, recovered) = DataDir::open(dir.path(), 1).expect("reopen");
        assert_eq!(recovered.torn, None);
        assert_eq!(recovered.log.entries.len(), 3);
    }

    #[test]
    fn a_zero_filled_tail_is_torn_not_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_some(dir.path());
        let path = dir.path().join(WAL_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&[0u8; 100]).expect("zeros");
        drop(file);
        let (_data, recovered) = DataDir::open(dir.path(), 1).expect("reopen");
        assert_eq!(recovered.torn.map(|t| t.bytes), Some(100));
        assert_eq!(recovered.log.entries.len(), 3);
    }

    #[test]
    fn flipped_bytes_are_corruption_naming_file_and_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_some(dir.path());
        let path = dir.path().join(WAL_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 2;
        bytes[last] ^= 0xFF;
        std::fs::write(&path, &bytes).expect("write");
        let error = DataDir::open(dir.path(), 1).expect_err("corruption is refused");
        let text = error.to_string();
        assert!(matches!(error, StoreError::Corrupt { .. }), "{text}");
        assert!(
            text.contains(WAL_FILE) && text.contains("offset") && text.contains("checksum"),
            "{text}"
        );

        // A damaged length field is caught by the header checksum, not mistaken for a torn tail.
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[last] ^= 0xFF;
        let records_start = {
            let Frame::Complete { next, .. } = read_frame(&bytes, 0) else {
                panic!("header record")
            };
            next
        };
        bytes[records_start] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write");
        let error = DataDir::open(dir.path(), 1).expect_err("corruption is refused");
        assert!(
            error.to_string().contains(&format!("offset {records_start}")),
            "{error}"
        );
    }

    #[test]
    fn another_branchs_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_some(dir.path());
        let error = DataDir::open(dir.path(), 2).expect_err("wrong branch");
        assert!(
            matches!(
                error,
                StoreError::WrongBranch {
                    found: 1,
                    expected: 2,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_directory_in_use_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_held, _) = DataDir::open(dir.path(), 1).expect("open");
        let error = DataDir::open(dir.path(), 1).expect_err("locked");
        assert!(matches!(error, StoreError::Locked { .. }), "{error}");
    }

    #[test]
    fn compaction_keeps_the_live_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_some(dir.path());
        let (mut data, mut recovered) = DataDir::open(dir.path(), 1).expect("reopen");
        let purge = Record::Purge(LogId::new(CommittedLeaderId::new(1, 1), 1));
        data.append(std::slice::from_ref(&purge), true).expect("purge");
        recovered.log.apply(purge);
        data.compact(&recovered.log).expect("compact");
        data.append(&[Record::Truncate { from: 3 }], true).expect("truncate");
        drop(data);
        let (_data, recovered) = DataDir::open(dir.path(), 1).expect("reopen");
        assert_eq!(recovered.log.entries.keys().copied().collect::<Vec<_>>(), [2]);
        assert_eq!(recovered.log.last_purged.map(|id| id.index), Some(1));
        assert_eq!(recovered.log.vote, Some(Vote::new(2, 1)));
    }

    #[test]
    fn snapshots_round_trip_and_damage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (data, _) = DataDir::open(dir.path(), 1).expect("open");
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 7)),
            last_membership: Default::default(),
            snapshot_id: "s".into(),
        };
        data.snapshot_store(None).save(&meta, b"state").expect("save");
        drop(data);
        let (_data, recovered) = DataDir::open(dir.path(), 1).expect("reopen");
        let (found, bytes) = recovered.snapshot.expect("snapshot");
        assert_eq!((found, bytes.as_slice()), (meta, b"state".as_slice()));
        drop(_data);

        let path = dir.path().join(SNAPSHOT_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let error = DataDir::open(dir.path(), 1).expect_err("corrupt snapshot");
        assert!(error.to_string().contains(SNAPSHOT_FILE), "{error}");
    }
}
