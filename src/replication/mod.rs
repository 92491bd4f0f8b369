//! Consensus glue: openraft's type configuration, the log and state-machine stores (in memory,
//! optionally backed by a data directory), and the network client that carries Raft messages
//! over the peer gRPC service (sending learners each entry with its commit: [`piggyback`];
//! learners no customer waits on get entries in batches: [`demand`]; the voters' replies
//! give the leader its read lease: [`lease`]).
//!
//! The branch-level operations built on top (forwarding writes to the leader, linearizable
//! reads on any member) live in [`crate::branch`]; this module knows nothing about customers.

pub mod demand;
pub mod disk;
pub mod lease;
pub mod network;
pub mod piggyback;
pub mod store;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::account::{Applied, Command};

/// A log entry's payload: the writes proposed together (group commit, see [`crate::batch`]),
/// applied in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub writes: Vec<Proposed>,
}

/// One customer write in a [`Proposal`]: the command, and the W3C `traceparent` of the request
/// that wrote it (only with tracing on), so every branch that applies it joins the customer's
/// trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposed {
    pub command: Command,
    pub traceparent: Option<String>,
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let commands: Vec<&Command> = self.writes.iter().map(|write| &write.command).collect();
        write!(f, "{commands:?}")
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for one replicated bank account.
    pub TypeConfig:
        D = Proposal,
        R = Vec<Applied>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A random number below `bound` (0 when `bound` is 0), for timers' jitter: std keys each
/// thread's `RandomState`s randomly and every new one differently, which is random enough to
/// spread timers without a dependency.
pub fn random_below(bound: u64) -> u64 {
    use std::hash::BuildHasher as _;
    std::collections::hash_map::RandomState::new().hash_one(bound) % bound.max(1)
}

/// A member's id: the branch id.
pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;

/// Timing of the consensus protocol. openraft also uses the heartbeat interval as the timeout
/// of every AppendEntries call, so it must cover a slow, loaded machine (a debug build on two
/// busy cores takes tens of milliseconds per call). A follower refuses votes and starts no
/// election for `election_timeout_max` after it last heard from the leader, then waits a
/// random time in [min, max): a dead leader is replaced after `min + max` to `2 max`. Every
/// branch of a cluster must use the same election timeouts: the leader's read lease relies on
/// its followers' ([`lease`]).
#[derive(Debug, Clone, Copy)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Whether the leader answers read-index requests from its read lease ([`lease`]) instead
    /// of confirming its leadership with a quorum round for every read.
    pub read_lease: bool,
    /// A branch snapshots its state (balance and event-id tables) once this many log entries
    /// were applied since its last snapshot, and then drops all but the last tenth of them
    /// from its log. A peer that falls behind the dropped part gets the snapshot instead.
    pub snapshot_every: u64,
}

impl RaftTiming {
    /// The leader's read lease; zero when leases are off.
    pub fn read_lease(&self) -> std::time::Duration {
        if self.read_lease {
            lease::read_lease(std::time::Duration::from_millis(self.election_timeout_max_ms))
        } else {
            std::time::Duration::ZERO
        }
    }
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_ms: 200,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            read_lease: true,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
        }
    }
}

/// Log entries between snapshots by default: a snapshot serializes the whole state (1.3 MB
/// measured with 120,000 event ids recorded, so ~2 MB with a full table), so not too often;
/// the log kept in memory between them is at most this many entries.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 10_000;

/// Builds and validates openraft's configuration.
#[allow(clippy::result_large_err)] // openraft's error type, returned once at start-up
pub fn raft_config(timing: RaftTiming) -> Result<openraft::Config, openraft::ConfigError> {
    openraft::Config {
        cluster_name: "distbank".to_string(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_timeout_min_ms,
        election_timeout_max: timing.election_timeout_max_ms,
        // Elections are started by the branch's own timer, after a pre-vote
        // (crate::branch's election module), not by openraft's.
        enable_elect: false,
        // Snapshot and purge so the log does not grow without bound on long runs.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(timing.snapshot_every.max(1)),
        // The last tenth stays, so a peer only slightly behind gets entries, not the snapshot.
        max_in_snapshot_log_to_keep: timing.snapshot_every / 10,
        ..Default::default()
    }
    .validate()
}

/// The byte encoding of Raft messages on the peer service and of the data directory's records
/// (bincode, standard configuration: compact and fast). Public for the fuzz targets.
///
/// Decoding is bounded: bincode allocates a string or byte array at the length its prefix
/// claims before reading it, so without a bound five hostile bytes claiming an exabyte abort
/// the process (found by the `raft_message` fuzz target). Only strings and byte arrays count
/// towards the bound, and their contents are in the input, so a genuine message never claims
/// more than its own size.
pub mod codec {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// Most a peer's message may claim: the largest message the peer service accepts.
    const MESSAGE_LIMIT: usize = super::network::MAX_PEER_MESSAGE;
    /// Most a record of the data directory or a received snapshot may claim. Records are
    /// checksummed before they are decoded; the bound only keeps a bug from becoming an abort.
    const STORED_LIMIT: usize = 1 << 30;

    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
        bincode::serde::encode_to_vec(value, bincode::config::standard())
    }

    /// A Raft message from a peer.
    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
        let config = bincode::config::standard().with_limit::<MESSAGE_LIMIT>();
        bincode::serde::decode_from_slice(bytes, config).map(|(value, _)| value)
    }

    /// A record of the data directory, or a snapshot's state.
    pub fn decode_stored<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
        let config = bincode::config::standard().with_limit::<STORED_LIMIT>();
        bincode::serde::decode_from_slice(bytes, config).map(|(value, _)| value)
    }

    #[cfg(test)]
    mod tests {
        use bincode::error::DecodeError;
        use openraft::error::{InstallSnapshotError, RaftError};
        use openraft::raft::InstallSnapshotResponse;

        use super::*;
        use crate::replication::NodeId;

        type SnapshotReply = Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;

        /// The fuzz target's find: an InstallSnapshot reply whose snapshot-mismatch error
        /// claims a segment id string of 6.7 exabytes. Unbounded, decoding it aborted.
        #[test]
        fn a_length_claiming_more_than_the_limit_is_an_error_not_an_abort() {
            let hostile = [
                0x01, 0x00, 0x00, 0xfd, 0x04, 0x05, 0x00, 0x01, 0x08, 0x00, 0xfb, 0x5d, 0xef,
            ];
            let error = decode::<SnapshotReply>(&hostile).expect_err("refused");
            assert!(matches!(error, DecodeError::LimitExceeded), "{error:?}");
            let error = decode_stored::<SnapshotReply>(&hostile).expect_err("refused");
            assert!(matches!(error, DecodeError::LimitExceeded), "{error:?}");
        }

        #[test]
        fn messages_within_the_limit_round_trip() {
            let value = (String::from("x").repeat(1000), vec![7u8; 100_000]);
            let bytes = encode(&value).expect("encodes");
            assert_eq!(decode::<(String, Vec<u8>)>(&bytes).expect("decodes"), value);
            assert_eq!(decode_stored::<(String, Vec<u8>)>(&bytes).expect("decodes"), value);
        }
    }
}
