//! Consensus glue: openraft's type configuration, the log and state-machine stores (in memory,
//! optionally backed by a data directory), and the network client that carries Raft messages
//! over the peer gRPC service (sending learners each entry with its commit: [`piggyback`]).
//!
//! The branch-level operations built on top (forwarding writes to the leader, linearizable
//! reads on any member) live in [`crate::branch`]; this module knows nothing about customers.

pub mod disk;
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

/// A member's id: the branch id.
pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;

/// Timing of the consensus protocol. openraft also uses the heartbeat interval as the timeout
/// of every AppendEntries call, so it must cover a slow, loaded machine (a debug build on two
/// busy cores takes tens of milliseconds per call); a dead leader is replaced in 1-2 s.
#[derive(Debug, Clone, Copy)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_ms: 200,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
        }
    }
}

/// Builds and validates openraft's configuration.
#[allow(clippy::result_large_err)] // openraft's error type, returned once at start-up
pub fn raft_config(timing: RaftTiming) -> Result<openraft::Config, openraft::ConfigError> {
    openraft::Config {
        cluster_name: "distbank".to_string(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_timeout_min_ms,
        election_timeout_max: timing.election_timeout_max_ms,
        // Snapshot and purge so the log does not grow without bound on long runs.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1_000,
        ..Default::default()
    }
    .validate()
}

/// Serialization of Raft messages for the peer service (bincode: compact and fast).
pub(crate) mod codec {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
        bincode::serde::encode_to_vec(value, bincode::config::standard())
    }

    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map(|(value, _)| value)
    }
}
