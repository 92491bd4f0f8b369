//! Generated gRPC code and every conversion between wire types and domain types: nothing
//! outside this module and the service edges touches a prost type.

use crate::account::{Command, Operation, Outcome};

/// The original wire API (`proto/banks.proto`, package-less: `/Bank/MsgDelivery`).
pub mod bank {
    tonic::include_proto!("_");

    /// `proto/banks.proto` as an encoded `FileDescriptorSet`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("banks_descriptor");
}

/// The peer-only API branches use among themselves (`proto/peer.proto`).
pub mod peer {
    tonic::include_proto!("distbank.peer.v1");
}

/// gRPC metadata key carrying the customer's event id (the idempotency key) on the original
/// API, whose messages have no field for it.
pub const EVENT_ID_METADATA: &str = "x-distbank-event-id";

/// The original API's `status` strings.
pub const STATUS_SUCCESS: &str = "success";
pub const STATUS_FAIL: &str = "fail";

pub fn operation_to_peer(operation: Operation) -> (peer::Operation, u64) {
    match operation {
        Operation::Deposit(amount) => (peer::Operation::Deposit, amount),
        Operation::Withdraw(amount) => (peer::Operation::Withdraw, amount),
        Operation::Query => (peer::Operation::Query, 0),
    }
}

/// Encodes a log command as a forwarded [`peer::Write`]'s (event id, operation, amount): a
/// `RecordQuery` travels as a query whose amount is the balance answered.
pub fn command_to_peer(command: &Command) -> (Option<u64>, peer::Operation, u64) {
    match *command {
        Command::RecordQuery { event_id, balance } => (Some(event_id), peer::Operation::Query, balance),
        _ => {
            let (operation, amount) = operation_to_peer(command.operation());
            (command.event_id(), operation, amount)
        }
    }
}

/// Decodes a forwarded [`peer::Write`] into the command to propose; `Err`: why it is refused.
pub fn command_from_peer(event_id: Option<u64>, operation: i32, amount: u64) -> Result<Command, String> {
    let operation = operation_from_peer(operation, amount).ok_or_else(|| format!("unknown operation {operation}"))?;
    match (operation, event_id) {
        (Operation::Deposit(amount), event_id) => Ok(Command::PropagateDeposit { event_id, amount }),
        (Operation::Withdraw(amount), event_id) => Ok(Command::PropagateWithdraw { event_id, amount }),
        // A query's entry records the answer given (amount = the balance), by event id.
        (Operation::Query, Some(event_id)) => Ok(Command::RecordQuery {
            event_id,
            balance: amount,
        }),
        (Operation::Query, None) => Err("a query without an event id has nothing to record".into()),
    }
}

pub fn operation_from_peer(operation: i32, amount: u64) -> Option<Operation> {
    match peer::Operation::try_from(operation).ok()? {
        peer::Operation::Deposit => Some(Operation::Deposit(amount)),
        peer::Operation::Withdraw => Some(Operation::Withdraw(amount)),
        peer::Operation::Query => Some(Operation::Query),
        peer::Operation::Unspecified => None,
    }
}

/// Encodes an outcome as (outcome, balance) for [`peer::SubmitReply`].
pub fn outcome_to_peer(outcome: Outcome, balance_after: u64) -> (peer::Outcome, u64) {
    match outcome {
        Outcome::Success => (peer::Outcome::Success, balance_after),
        Outcome::Fail => (peer::Outcome::Fail, balance_after),
        Outcome::Balance(balance) => (peer::Outcome::Balance, balance),
        Outcome::EventIdReused { .. } => (peer::Outcome::EventIdReused, balance_after),
    }
}

/// Decodes a [`peer::SubmitReply`]'s outcome. `EventIdReused` loses the recorded operation on
/// the way (the customer's branch waits for its own replica to apply the entry and reads it
/// there).
pub fn outcome_from_peer(outcome: i32, balance: u64) -> Option<Outcome> {
    match peer::Outcome::try_from(outcome).ok()? {
        peer::Outcome::Success => Some(Outcome::Success),
        peer::Outcome::Fail => Some(Outcome::Fail),
        peer::Outcome::Balance => Some(Outcome::Balance(balance)),
        peer::Outcome::EventIdReused => Some(Outcome::EventIdReused {
            recorded: Operation::Query,
        }),
        peer::Outcome::Unspecified => None,
    }
}
