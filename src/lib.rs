//! distbank: a replicated bank. Every *branch* holds a replica of one account balance;
//! customers send Deposit / Withdraw / Query to their own branch over the original
//! `Bank/MsgDelivery` gRPC API, and branches agree on every change through Raft (openraft),
//! so all replicas show the same balance and every operation is linearizable.
//!
//! # Layout
//!
//! The path of one deposit through `distbank run input.json`:
//!
//! - [`input`] loads and validates the course's input.json (errors name file, item, field).
//! - [`cluster`] starts one branch per input branch on loopback listeners (all on one thread
//!   for a sequential replay, spread over single-threaded runtimes, one per core, for
//!   concurrent customers), and waits until each reports SERVING.
//! - [`replay`] sends each customer's events, in event-id order, to the customer's branch,
//!   with the event id as idempotency key, retrying transient failures.
//! - [`service::bank`] is the customer API: validates the request, refuses `propagate_*`,
//!   hands the operation to the branch.
//! - [`branch`] turns it into a log entry ([`account::Command::PropagateDeposit`]), forwards it
//!   to the leader if needed ([`service::peer`]'s `Submit`), waits for commit and for its own
//!   replica to apply it (concurrent writes share entries and `Submit` calls: [`batch`]);
//!   queries are linearizable reads (ReadIndex: the leader answers from its read lease,
//!   [`replication::lease`], or with a quorum round, concurrent ones sharing one round
//!   through [`coalesce`]); the answer to a query with an event id is remembered, and on a
//!   standalone branch also recorded in the log afterwards, so restarts keep it.
//! - [`replication`] is the openraft glue: type config, the log and state machine stores (in
//!   memory, or backed by a data directory with `distbank branch --data-dir`:
//!   [`replication::disk`] is the checksummed on-disk format), the peer network client
//!   ([`replication::piggyback`]: learners get each entry with its commit, one message per write;
//!   [`replication::demand`]: learners no customer waits on get the writes in batches).
//!   Elections are openraft's, but when a voter campaigns is the branch's own decision: only
//!   after a pre-vote round finds a majority (the `election` module of [`branch`]), or at once
//!   when a leader that is stopping asks it to take over (`handoff`, Raft's TimeoutNow); a
//!   voter that started with an empty data directory votes only once it has caught up.
//! - [`account`] is the state machine itself, pure: balance, withdraw-fails-when-short, the
//!   event-id → result table.
//! - [`output`] writes the course-format output.json atomically.
//!
//! Around them: [`discovery`] (peer and branch addresses: lists, `{id}`/`{ordinal}` templates,
//! StatefulSet ordinals), [`transport`] (how every connection is made: client endpoints, local
//! deadlines on outbound calls, which failed calls are worth retrying, TLS from Secret-style
//! directories, re-read while a branch runs so renewed certificates need no restart),
//! [`proto`] (generated code and every wire conversion), [`telemetry`]
//! (logging, OTLP trace export only when an endpoint is set, W3C context in gRPC metadata and
//! in log entries), [`metrics`] (Prometheus `/metrics` on its own listener), [`bench`](mod@bench) (timed local runs for `distbank bench`), [`artifact`] (uploading
//! output.json to a Kubernetes ConfigMap from the replay Job). The `distbank` binary
//! (`src/bin/distbank/`: `cli.rs` the flags, `commands.rs` the subcommands) is a thin layer
//! over this library.

pub mod account;
pub mod artifact;
pub mod batch;
pub mod bench;
pub mod branch;
pub mod cluster;
pub mod coalesce;
pub mod discovery;
pub mod input;
pub mod metrics;
pub mod output;
pub mod proto;
pub mod replay;
pub mod replication;
pub mod service;
pub mod telemetry;
pub mod transport;

/// The original implementation's port scheme: branch N listens on `BASE_PORT + N`.
pub const BASE_PORT: u16 = 50050;

/// An error and its sources on one line ("connection refused" is usually a few levels down).
/// Many errors already quote their source in their own message; a source the line holds as a
/// whole segment (after ": ") is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if cause_text != text && !text.contains(&format!(": {cause_text}")) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
