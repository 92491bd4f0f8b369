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

/// How much of a client's text a status message may quote.
const QUOTED_CHARS: usize = 32;

/// Quotes client-provided text in a status message, escaped and clipped: the message travels
/// percent-encoded in the `grpc-message` header, and a message that grew with its input could
/// pass the client's header-list limit, which turns the refusal into an HTTP/2 stream reset.
pub(crate) fn quote(text: &str) -> String {
    let chars = text.chars().count();
    if chars <= QUOTED_CHARS {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(QUOTED_CHARS).collect();
    format!("{head:?}… ({} bytes)", text.len())
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn short_text_is_quoted_whole_and_long_text_is_clipped() {
        assert_eq!(quote("transfer"), "\"transfer\"");
        let long = "\u{1d}".repeat(4096);
        let quoted = quote(&long);
        assert!(quoted.len() < 300, "{quoted}");
        assert!(quoted.ends_with("… (4096 bytes)"), "{quoted}");
    }
}
