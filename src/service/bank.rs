//! The customer-facing API: exactly the original `Bank/MsgDelivery` (proto/banks.proto), so
//! clients and servers generated from that proto by other tools interoperate unchanged.
//!
//! The event id (idempotency key) travels in the `x-distbank-event-id` metadata entry, since
//! the original messages have no field for it; requests without it are executed once each.

use tonic::{Request, Response, Status};

use crate::account::{MAX_BALANCE, Operation, Outcome};
use crate::branch::Branch;
use crate::proto::bank::bank_server::Bank;
use crate::proto::bank::{TransactionRequest, TransactionResponse};
use crate::proto::{EVENT_ID_METADATA, STATUS_FAIL, STATUS_SUCCESS};
use crate::{metrics, telemetry};
use tracing::Instrument as _;

pub struct BankService {
    branch: Branch,
}

impl BankService {
    pub fn new(branch: Branch) -> BankService {
        BankService { branch }
    }
}

/// Reads the optional event id from the request metadata.
fn event_id<T>(request: &Request<T>) -> Result<Option<u64>, Status> {
    let Some(value) = request.metadata().get(EVENT_ID_METADATA) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(format!("metadata {EVENT_ID_METADATA}: expected a non-negative integer"))
        })
}

/// Turns the wire request into an operation, refusing what customers may not do.
fn operation(request: &TransactionRequest) -> Result<Operation, Status> {
    let amount = || -> Result<u64, Status> {
        match u64::try_from(request.amount) {
            Ok(amount) if amount > 0 => Ok(amount),
            _ => Err(Status::invalid_argument(format!(
                "amount: expected a positive integer for {}, got {}",
                request.operation, request.amount
            ))),
        }
    };
    match request.operation.as_str() {
        "deposit" => Ok(Operation::Deposit(amount()?)),
        "withdraw" => Ok(Operation::Withdraw(amount()?)),
        "query" => Ok(Operation::Query),
        // In the original these were how branches told each other; here replicas change only
        // through consensus on the peer service, so a customer must not be able to mint or
        // burn money on one replica.
        "propagate_deposit" | "propagate_withdraw" => Err(Status::permission_denied(format!(
            "operation {:?} is branch-internal and not accepted from customers",
            request.operation
        ))),
        other => Err(Status::invalid_argument(format!(
            "operation {}: expected \"deposit\", \"withdraw\" or \"query\"",
            super::quote(other)
        ))),
    }
}

fn balance_i32(balance: u64) -> i32 {
    // Balances never exceed MAX_BALANCE (= i32::MAX); the account refuses deposits beyond it.
    i32::try_from(balance.min(MAX_BALANCE)).unwrap_or(i32::MAX)
}

#[tonic::async_trait]
impl Bank for BankService {
    async fn msg_delivery(
        &self,
        request: Request<TransactionRequest>,
    ) -> Result<Response<TransactionResponse>, Status> {
        let started = metrics::enabled().then(std::time::Instant::now);
        let operation = operation_label(&request.get_ref().operation);
        let result = self.traced(request).await;
        if let Some(started) = started {
            metrics::record_operation(self.branch.id(), operation, result_label(&result), started.elapsed());
        }
        result
    }
}

/// The operation as a metric label (a fixed set, whatever the customer sent).
fn operation_label(operation: &str) -> &'static str {
    match operation {
        "deposit" => "deposit",
        "withdraw" => "withdraw",
        "query" => "query",
        _ => "invalid",
    }
}

/// The answer in one word (metric label and span attribute): the reply's status, or the error.
fn result_label(result: &Result<Response<TransactionResponse>, Status>) -> &'static str {
    let code = match result {
        Ok(reply) if reply.get_ref().status == STATUS_SUCCESS => return "success",
        Ok(_) => return "fail",
        Err(status) => status.code(),
    };
    match code {
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::AlreadyExists => "already_exists",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        tonic::Code::Cancelled => "cancelled",
        _ => "error",
    }
}

impl BankService {
    async fn traced(&self, request: Request<TransactionRequest>) -> Result<Response<TransactionResponse>, Status> {
        if !telemetry::enabled() {
            return self.deliver(request).await;
        }
        let span = tracing::info_span!(
            "MsgDelivery",
            otel.name = "Bank/MsgDelivery",
            otel.kind = "server",
            branch.id = self.branch.id(),
            customer.id = request.get_ref().customer_id,
            event.id = tracing::field::Empty,
            operation = request.get_ref().operation.as_str(),
            amount = request.get_ref().amount,
            result = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        telemetry::set_parent_from_metadata(&span, request.metadata());
        if let Ok(Some(id)) = event_id(&request) {
            span.record("event.id", id);
        }
        let result = self.deliver(request).instrument(span.clone()).await;
        span.record("result", result_label(&result));
        result
    }

    async fn deliver(&self, request: Request<TransactionRequest>) -> Result<Response<TransactionResponse>, Status> {
        let event_id = event_id(&request)?;
        let operation = operation(request.get_ref())?;
        let outcome = self.branch.execute(event_id, operation).await?;
        let reply = match outcome {
            Outcome::Success => TransactionResponse {
                status: STATUS_SUCCESS.into(),
                balance: 0,
            },
            Outcome::Fail => TransactionResponse {
                status: STATUS_FAIL.into(),
                balance: 0,
            },
            Outcome::Balance(balance) => TransactionResponse {
                status: STATUS_SUCCESS.into(),
                balance: balance_i32(balance),
            },
            Outcome::EventIdReused { recorded } => {
                return Err(Status::already_exists(format!(
                    "event id {} was already used for {} {}",
                    event_id.unwrap_or_default(),
                    recorded.interface(),
                    match recorded {
                        Operation::Deposit(amount) | Operation::Withdraw(amount) => amount.to_string(),
                        Operation::Query => String::new(),
                    }
                )));
            }
        };
        Ok(Response::new(reply))
    }
}
