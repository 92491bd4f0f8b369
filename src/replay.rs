//! The customers' side: replays every customer item of an input against running branches
//! (customer N talks to branch N over the original `Bank/MsgDelivery` API) and collects the
//! answers into the course's output.
//!
//! Each event carries its id as the idempotency key, so a timed-out or failed call is simply
//! sent again with the same id, and a re-run of the whole replay gives the same answers.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::account::Operation;
use crate::discovery::{Addresses, DiscoveryError};
use crate::input::{CustomerSpec, Event, Input};
use crate::output::{CustomerOutput, Recv};
use crate::proto::bank::bank_client::BankClient;
use crate::proto::bank::{TransactionRequest, TransactionResponse};
use crate::proto::{EVENT_ID_METADATA, STATUS_FAIL, STATUS_SUCCESS};
use crate::{telemetry, transport};
use tracing::Instrument as _;

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// How many customer items run at once (1 = one after another, the course's semantics).
    pub concurrency: usize,
    /// Deadline of one call; a call that misses it is retried with the same event id.
    pub call_timeout: Duration,
    /// How long one event may keep being retried before the replay gives up.
    pub retry_budget: Duration,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            concurrency: 1,
            call_timeout: Duration::from_secs(10),
            retry_budget: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Address(#[from] DiscoveryError),
    #[error("branch {branch}: invalid address {address:?}: {reason}")]
    BadAddress {
        branch: u64,
        address: String,
        reason: String,
    },
    #[error("customer {customer}, event {event}: branch {branch} refused the request: {code}: {message}")]
    Refused {
        customer: u64,
        event: u64,
        branch: u64,
        code: tonic::Code,
        message: String,
    },
    #[error("customer {customer}, event {event}: branch {branch} unreachable for {seconds:.0} s: {last_error}")]
    GaveUp {
        customer: u64,
        event: u64,
        branch: u64,
        seconds: f64,
        last_error: String,
    },
    #[error("customer {customer}, event {event}: unexpected reply from branch {branch}: status {status:?}")]
    BadReply {
        customer: u64,
        event: u64,
        branch: u64,
        status: String,
    },
}

/// Connections to the branches customers talk to: one lazily connected channel per branch.
#[derive(Debug, Clone)]
pub struct BranchClients {
    channels: BTreeMap<u64, Channel>,
}

impl BranchClients {
    /// `addresses` yields URLs (`http://host:port`); a bare `host:port` gets `http://`.
    pub fn new(
        addresses: &Addresses,
        branch_ids: &[u64],
        connect_timeout: Duration,
    ) -> Result<BranchClients, ReplayError> {
        BranchClients::with_tls(addresses, branch_ids, connect_timeout, None)
    }

    /// [`BranchClients::new`], over TLS when `tls` is given (a bare `host:port` gets `https://`
    /// and the branch's certificate must name that host).
    pub fn with_tls(
        addresses: &Addresses,
        branch_ids: &[u64],
        connect_timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<BranchClients, ReplayError> {
        let mut channels = BTreeMap::new();
        for &branch in branch_ids {
            let address = addresses.address(branch)?;
            let endpoint =
                transport::endpoint(&address, connect_timeout, tls).map_err(|e| ReplayError::BadAddress {
                    branch,
                    address: address.clone(),
                    reason: e.to_string(),
                })?;
            channels.insert(branch, transport::connect_lazy(&endpoint));
        }
        Ok(BranchClients { channels })
    }

    fn client(&self, branch: u64) -> Result<BankClient<Channel>, ReplayError> {
        self.channels
            .get(&branch)
            .cloned()
            .map(BankClient::new)
            .ok_or(ReplayError::Address(DiscoveryError::Unknown(branch)))
    }

    /// A customer-API client for `branch`.
    pub fn bank_client(&self, branch: u64) -> Option<BankClient<Channel>> {
        self.channels.get(&branch).cloned().map(BankClient::new)
    }

    pub fn channel(&self, branch: u64) -> Option<Channel> {
        self.channels.get(&branch).cloned()
    }
}

/// Replays every customer item of `input`; answers come back in input order.
pub async fn replay(
    input: &Input,
    clients: &BranchClients,
    options: &ReplayOptions,
) -> Result<Vec<CustomerOutput>, ReplayError> {
    Ok(replay_timed(input, clients, options).await?.0)
}

/// How long one event took, from the first send to the answer (retries included).
#[derive(Debug, Clone, Copy)]
pub struct EventTiming {
    pub operation: Operation,
    pub latency: Duration,
}

/// [`replay`], also returning every event's latency (for benchmarks).
pub async fn replay_timed(
    input: &Input,
    clients: &BranchClients,
    options: &ReplayOptions,
) -> Result<(Vec<CustomerOutput>, Vec<EventTiming>), ReplayError> {
    let results: Vec<Result<(CustomerOutput, Vec<EventTiming>), ReplayError>> =
        futures::stream::iter(input.customers.iter())
            .map(|customer| run_customer(customer, clients, options))
            .buffered(options.concurrency.max(1))
            .collect()
            .await;
    let mut outputs = Vec::with_capacity(results.len());
    let mut timings = Vec::with_capacity(input.event_count());
    for result in results {
        let (output, customer_timings) = result?;
        outputs.push(output);
        timings.extend(customer_timings);
    }
    Ok((outputs, timings))
}

/// One customer item: its events in event-id order, each waiting for the previous answer.
async fn run_customer(
    customer: &CustomerSpec,
    clients: &BranchClients,
    options: &ReplayOptions,
) -> Result<(CustomerOutput, Vec<EventTiming>), ReplayError> {
    let mut events: Vec<&Event> = customer.events.iter().collect();
    events.sort_by_key(|event| event.id);
    let mut client = clients.client(customer.id)?;
    let mut recv = Vec::with_capacity(events.len());
    let mut timings = Vec::with_capacity(events.len());
    for event in events {
        let started = Instant::now();
        recv.push(send_event(&mut client, customer.id, event, options).await?);
        timings.push(EventTiming {
            operation: event.operation,
            latency: started.elapsed(),
        });
    }
    Ok((CustomerOutput { id: customer.id, recv }, timings))
}

/// Sends one event, retrying transient failures with the same event id.
pub async fn send_event(
    client: &mut BankClient<Channel>,
    customer: u64,
    event: &Event,
    options: &ReplayOptions,
) -> Result<Recv, ReplayError> {
    let (operation, amount) = match event.operation {
        Operation::Deposit(amount) => ("deposit", amount),
        Operation::Withdraw(amount) => ("withdraw", amount),
        Operation::Query => ("query", 0),
    };
    // Input validation caps amounts at the wire's int32 range.
    let amount = i32::try_from(amount).unwrap_or(i32::MAX);
    if !telemetry::enabled() {
        return send_with_retries(client, customer, event, operation, amount, options).await;
    }
    // The root of the event's trace: every branch's work for it hangs below this span.
    let span = tracing::info_span!(
        "replay.event",
        otel.name = format!("replay {operation}"),
        otel.kind = "client",
        customer.id = customer,
        event.id = event.id,
        operation,
        amount,
        result = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    telemetry::record_trace_id(&span);
    let result = send_with_retries(client, customer, event, operation, amount, options)
        .instrument(span.clone())
        .await;
    span.record(
        "result",
        match &result {
            Ok(recv) => recv.label(),
            Err(_) => "error",
        },
    );
    result
}

async fn send_with_retries(
    client: &mut BankClient<Channel>,
    customer: u64,
    event: &Event,
    operation: &str,
    amount: i32,
    options: &ReplayOptions,
) -> Result<Recv, ReplayError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(10);
    loop {
        let mut request = tonic::Request::new(TransactionRequest {
            customer_id: i32::try_from(customer).unwrap_or(i32::MAX),
            operation: operation.to_string(),
            amount,
        });
        request
            .metadata_mut()
            .insert(EVENT_ID_METADATA, MetadataValue::from(event.id));
        telemetry::inject_metadata(request.metadata_mut());
        let last_error = match transport::call(options.call_timeout, request, |r| client.msg_delivery(r)).await {
            Ok(reply) => return recv_from_reply(customer, event, reply.into_inner()),
            Err(status) if transport::is_transient(&status) => status_summary(&status),
            Err(status) => {
                return Err(ReplayError::Refused {
                    customer,
                    event: event.id,
                    branch: customer,
                    code: status.code(),
                    message: status.message().to_string(),
                });
            }
        };
        if started.elapsed() + backoff > options.retry_budget {
            return Err(ReplayError::GaveUp {
                customer,
                event: event.id,
                branch: customer,
                seconds: started.elapsed().as_secs_f64(),
                last_error,
            });
        }
        tracing::debug!(customer, event = event.id, error = %last_error, "retrying with the same event id");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

fn recv_from_reply(customer: u64, event: &Event, reply: TransactionResponse) -> Result<Recv, ReplayError> {
    let bad = || ReplayError::BadReply {
        customer,
        event: event.id,
        branch: customer,
        status: reply.status.clone(),
    };
    let success = match reply.status.to_ascii_lowercase().as_str() {
        STATUS_SUCCESS => true,
        // Other implementations answer "failure"/"FAILURE"; accept them.
        STATUS_FAIL | "failure" => false,
        _ => return Err(bad()),
    };
    Ok(match event.operation {
        Operation::Deposit(_) => Recv::Deposit { success },
        Operation::Withdraw(_) => Recv::Withdraw { success },
        Operation::Query => Recv::Query {
            balance: u64::try_from(reply.balance).map_err(|_| bad())?,
        },
    })
}

/// Waits until every branch answers `grpc.health.v1` with SERVING (the same check the
/// Kubernetes probes make), logging progress; fails after `timeout` naming who is not ready.
pub async fn wait_until_serving(clients: &BranchClients, timeout: Duration) -> Result<(), WaitError> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let deadline = Instant::now() + timeout;
    let mut waiting: Vec<(u64, String)> = clients
        .channels
        .keys()
        .map(|&branch| (branch, "not checked yet".to_string()))
        .collect();
    let mut last_report = Instant::now();
    loop {
        let checks = waiting.iter().map(|&(branch, _)| {
            let channel = clients.channels.get(&branch).cloned();
            async move {
                let Some(channel) = channel else {
                    return (branch, Err("no address".to_string()));
                };
                let request = tonic::Request::new(HealthCheckRequest { service: String::new() });
                let mut health = HealthClient::new(channel);
                let status = transport::call(Duration::from_secs(2), request, |r| health.check(r))
                    .await
                    .map_err(|status| status_summary(&status))
                    .and_then(|reply| match ServingStatus::try_from(reply.into_inner().status) {
                        Ok(ServingStatus::Serving) => Ok(()),
                        Ok(other) => Err(other.as_str_name().to_string()),
                        Err(_) => Err("an unknown health status".to_string()),
                    });
                (branch, status)
            }
        });
        waiting = futures::future::join_all(checks)
            .await
            .into_iter()
            .filter_map(|(branch, status)| status.err().map(|why| (branch, why)))
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(WaitError {
                seconds: timeout.as_secs_f64(),
                waiting,
            });
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            let (first, why) = &waiting[0];
            tracing::info!(waiting = waiting.len(), first, why = %why, "waiting for branches to report SERVING");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// A failed health call in a few words: the code, the message, and the root cause (tonic's
/// "tcp connect error" hides "Connection refused" in its source).
fn status_summary(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(status);
    let mut root = None;
    while let Some(error) = cause {
        root = Some(error);
        cause = error.source();
    }
    if let Some(root) = root.map(|e| e.to_string())
        && !text.contains(&root)
    {
        text.push_str(": ");
        text.push_str(&root);
    }
    text.chars().take(200).collect()
}

/// Branches that did not report SERVING in time, each with its last answer.
#[derive(Debug, thiserror::Error)]
#[error("{} branch(es) not SERVING after {seconds:.0} s: {}", waiting.len(), describe_waiting(waiting))]
pub struct WaitError {
    pub seconds: f64,
    /// Branch id and what its last health check got (a status, or why the call failed).
    pub waiting: Vec<(u64, String)>,
}

/// The first few branches and their last answers (a 100-branch list would drown the line).
fn describe_waiting(waiting: &[(u64, String)]) -> String {
    const SHOWN: usize = 5;
    let mut text = waiting
        .iter()
        .take(SHOWN)
        .map(|(branch, why)| format!("branch {branch} ({why})"))
        .collect::<Vec<_>>()
        .join(", ");
    if waiting.len() > SHOWN {
        text.push_str(&format!(", and {} more", waiting.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_branch_that_never_serves_is_named_with_its_last_answer() {
        // A port nobody listens on: bound, then closed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let addresses = Addresses::Static([(7, addr.to_string())].into());
        let clients = BranchClients::new(&addresses, &[7], Duration::from_secs(1)).unwrap();
        let error = wait_until_serving(&clients, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(error.waiting.len(), 1);
        let message = error.to_string();
        assert!(message.starts_with("1 branch(es) not SERVING"), "{message}");
        assert!(message.contains("branch 7 (Unavailable"), "{message}");
    }

    #[test]
    fn a_long_list_of_waiting_branches_is_cut_short() {
        let waiting: Vec<(u64, String)> = (1..=50).map(|id| (id, "NOT_SERVING".to_string())).collect();
        let text = describe_waiting(&waiting);
        assert!(
            text.starts_with("branch 1 (NOT_SERVING), branch 2 (NOT_SERVING)"),
            "{text}"
        );
        assert!(text.ends_with(", and 45 more"), "{text}");
    }
}
