//! The two gRPC services a branch serves, kept apart: customers reach only [`bank`]; only
//! branches reach [`peer`] (its own listener, so a NetworkPolicy can fence it).

pub mod bank;
pub mod peer;

use crate::branch::BranchError;

impl From<BranchError> for tonic::Status {
    fn from(error: BranchError) -> Self {
        match error {
            // Retryable: the same event id may be sent again safely.
            BranchError::Unavailable(_) | BranchError::ShuttingDown => tonic::Status::unavailable(error.to_string()),
            _ => tonic::Status::internal(error.to_string()),
        }
    }
}
