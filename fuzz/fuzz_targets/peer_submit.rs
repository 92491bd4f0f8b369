//! Arbitrary batches of forwarded writes (`distbank.peer.v1.Peer/Submit`) over real gRPC against
//! a real single-branch distbank (its own leader): no panic; a batch with any invalid write is
//! refused with INVALID_ARGUMENT and changes nothing; an accepted batch answers every write, in
//! order, exactly as a sequential model of the account with its event-id table does. A query
//! with an event id is a write too: it records the answer (its amount) a branch gave to that
//! query (`Command::RecordQuery`), and changes no balance.
#![no_main]

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use distbank::cluster::LocalCluster;
use distbank::proto::peer::peer_client::PeerClient;
use distbank::proto::peer::{Operation, Outcome, SubmitRequest, Write};
use libfuzzer_sys::fuzz_target;
use tonic::Code;
use tonic::transport::Channel;

#[derive(Arbitrary, Debug)]
struct FuzzWrite {
    /// Event ids from a small range, so repeats are common and the idempotency table never
    /// reaches its window (the model keeps every id).
    event_id: Option<u16>,
    operation: i32,
    amount: u64,
    traceparent: String,
}

/// What the model remembers per event id: the operation (with the amount for a deposit or
/// withdrawal), and the outcome (with the balance recorded, for a query).
type Recorded = HashMap<u64, ((i32, u64), (Outcome, u64))>;

struct Model {
    balance: u64,
    recorded: Recorded,
}

struct Target {
    runtime: tokio::runtime::Runtime,
    cluster: LocalCluster,
    client: PeerClient<Channel>,
    model: Mutex<Model>,
}

const INITIAL_BALANCE: u64 = 1_000;
const MAX_BALANCE: u64 = i32::MAX as u64;

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let (runtime, cluster) = common::single_branch(INITIAL_BALANCE);
        let addr = cluster.branches()[0].peer_addr;
        let client = runtime
            .block_on(PeerClient::connect(format!("http://{addr}")))
            .expect("connects");
        Target {
            runtime,
            cluster,
            client,
            model: Mutex::new(Model {
                balance: INITIAL_BALANCE,
                recorded: HashMap::new(),
            }),
        }
    })
}

/// A write the leader must accept: a deposit or withdrawal, or a query's recorded answer,
/// which needs the event id it is recorded under.
fn valid(write: &Write) -> bool {
    write.operation == Operation::Deposit as i32
        || write.operation == Operation::Withdraw as i32
        || (write.operation == Operation::Query as i32 && write.event_id.is_some())
}

/// The model's answer (outcome, balance) to one write, applied to `model`: the balance is the
/// one recorded for a query, 0 otherwise (customers are told a balance only for queries).
fn apply(model: &mut Model, write: &Write) -> (Outcome, u64) {
    let query = write.operation == Operation::Query as i32;
    // A query's id matches any later answer to the same query: the first recorded one wins.
    let key = (write.operation, if query { 0 } else { write.amount });
    if let Some(id) = write.event_id
        && let Some((recorded_key, answer)) = model.recorded.get(&id)
    {
        return if *recorded_key == key {
            *answer
        } else {
            (Outcome::EventIdReused, 0)
        };
    }
    let outcome = if query {
        Outcome::Balance
    } else if write.operation == Operation::Deposit as i32 {
        match model.balance.checked_add(write.amount) {
            Some(sum) if sum <= MAX_BALANCE => {
                model.balance = sum;
                Outcome::Success
            }
            _ => Outcome::Fail,
        }
    } else if write.amount <= model.balance {
        model.balance -= write.amount;
        Outcome::Success
    } else {
        Outcome::Fail
    };
    let answer = (outcome, if query { write.amount } else { 0 });
    if let Some(id) = write.event_id {
        model.recorded.insert(id, (key, answer));
    }
    answer
}

// `sender`: who the forwarding branch says it is (any id, or none as from an older release):
// it only decides which learners the leader sends new entries at once, never an answer.
fuzz_target!(|input: (Vec<FuzzWrite>, Option<u64>)| {
    let (writes, sender) = input;
    let target = target();
    let writes: Vec<Write> = writes
        .into_iter()
        .take(32)
        .map(|w| Write {
            event_id: w.event_id.map(|id| u64::from(id % 1000)),
            operation: w.operation,
            amount: w.amount,
            traceparent: w.traceparent,
        })
        .collect();
    let mut model = target.model.lock().unwrap_or_else(|p| p.into_inner());
    let before = target.cluster.local_balances()[&1];
    assert_eq!(
        before, model.balance,
        "the model and the branch disagree before the call"
    );
    let mut client = target.client.clone();
    let reply = target.runtime.block_on(client.submit(SubmitRequest {
        writes: writes.clone(),
        sender,
    }));
    match reply {
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument, "unexpected status {status:?}");
            assert!(
                writes.iter().any(|w| !valid(w)),
                "a batch of valid writes was refused: {status:?}"
            );
            let after = target.cluster.local_balances()[&1];
            assert_eq!(after, before, "a refused batch changed the balance");
        }
        Ok(reply) => {
            assert!(writes.iter().all(valid), "an invalid write was accepted");
            let results = reply.into_inner().results;
            assert_eq!(results.len(), writes.len(), "one result per write");
            for (write, result) in writes.iter().zip(&results) {
                assert!(
                    result.error.is_empty(),
                    "the leader refused {write:?}: {}",
                    result.error
                );
                let (outcome, balance) = apply(&mut model, write);
                assert_eq!(result.outcome, outcome as i32, "answer to {write:?}");
                assert_eq!(result.balance, balance, "balance answered to {write:?}");
            }
            // The reply comes once the leader (the only branch) has applied the batch.
            let after = target.cluster.local_balances()[&1];
            assert_eq!(after, model.balance, "the balance after {writes:?}");
        }
    }
});
