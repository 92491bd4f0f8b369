//! What a branch's `grpc.health.v1` says: liveness while the process runs, readiness while
//! the branch can answer linearizably.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use super::Branch;
use crate::metrics;
use crate::proto::bank::bank_server::BankServer;
use crate::replication::NodeId;
use crate::service::bank::BankService;

/// The health service name that reports liveness: SERVING while the process runs.
pub const LIVENESS: &str = "liveness";
/// The health service name that reports readiness (so do "" and `Bank`).
pub const READINESS: &str = "readiness";

pub(super) async fn set_readiness(
    branch: NodeId,
    health: &tonic_health::server::HealthReporter,
    status: ServingStatus,
) {
    metrics::record_ready(branch, status == ServingStatus::Serving);
    health.set_service_status("", status).await;
    health.set_service_status(READINESS, status).await;
    match status {
        ServingStatus::Serving => health.set_serving::<BankServer<BankService>>().await,
        _ => health.set_not_serving::<BankServer<BankService>>().await,
    }
}

/// Readiness: SERVING once a linearizable read succeeds here (the branch knows the leader, is
/// a member, and has caught up with everything committed before the check); NOT_SERVING again
/// while it knows no leader (an election) or has lost touch with it (cut off from the leader,
/// or a leader cut off from its quorum, for longer than the leader lease), until a read
/// succeeds.
pub(super) async fn await_readiness(
    branch: Branch,
    health: tonic_health::server::HealthReporter,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let metrics = branch.raft().metrics();
    loop {
        loop {
            let attempt = branch.linearizable_read(Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = stop.cancelled() => return,
                result = attempt => if result.is_ok() { break },
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        branch.caught_up();
        set_readiness(branch.id(), &health, ServingStatus::Serving).await;
        let _ = ready.send(true);
        tracing::debug!(branch = branch.id(), "SERVING");
        // Polled, not woken on every metrics change: those come with every applied entry, on
        // every branch, and would cost more than the check (probes look every few seconds).
        let mut poll = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = poll.tick() => {}
            }
            if metrics.borrow().current_leader.is_none() || !branch.in_touch_with_leader().await {
                break;
            }
        }
        set_readiness(branch.id(), &health, ServingStatus::NotServing).await;
        let _ = ready.send(false);
        tracing::info!(
            branch = branch.id(),
            "no leader known or heard from: readiness NOT_SERVING until caught up"
        );
    }
}
