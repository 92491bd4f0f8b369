//! Running a branch: its listeners (customer API + health + reflection, peer API, an optional
//! plaintext health port for probes), start-up, and the shutdown order (readiness NOT_SERVING,
//! drain customers; a standalone branch then records its last query answers and hands the
//! leadership over; stop Raft, stop peers).

use std::any::Any;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};

use super::election::campaign;
use super::membership::manage_membership;
use super::readiness::{LIVENESS, await_readiness, set_readiness};
use super::{Branch, BranchConfig, BranchError, HandOff, MAX_CUSTOMER_MESSAGE, MAX_CUSTOMER_REQUESTS_PER_CONNECTION};
use crate::metrics;
use crate::proto::bank::bank_server::{Bank, BankServer};
use crate::proto::peer::peer_server::PeerServer;
use crate::replication::network::{MAX_PEER_MESSAGE, PeerChannels};
use crate::replication::store::Storage;
use crate::replication::{Raft, raft_config};
use crate::service::bank::BankService;
use crate::service::peer::PeerService;
use crate::transport::Incoming;

/// A started branch: its handle, its addresses, and the tasks serving it.
pub struct RunningBranch {
    pub branch: Branch,
    pub customer_addr: std::net::SocketAddr,
    pub peer_addr: std::net::SocketAddr,
    ready: watch::Receiver<bool>,
    /// Cancelling it stops this branch (the token it was started with).
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), BranchError>>,
}

impl RunningBranch {
    /// Resolves once the branch reports SERVING (it can answer linearizably).
    pub async fn ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Asks this branch to stop ([`RunningBranch::join`] waits for it).
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the branch has shut down (after its shutdown token was cancelled).
    pub async fn join(self) -> Result<(), BranchError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(BranchError::Start(format!("branch task failed: {e}"))),
        }
    }
}

/// Starts a branch on the given listeners; it runs until `shutdown` is cancelled.
///
/// `customer` serves the original `Bank` API and `grpc.health.v1`; `peer` serves the peer-only
/// API. Health reports NOT_SERVING until the branch can answer a linearizable read.
pub async fn start(
    config: BranchConfig,
    customer: TcpListener,
    peer: TcpListener,
    shutdown: CancellationToken,
) -> Result<RunningBranch, BranchError> {
    start_with_health(config, customer, peer, None, shutdown).await
}

/// [`start`], also serving `grpc.health.v1` alone, in plaintext, on `health`: Kubernetes' gRPC
/// probes cannot speak TLS, so a branch with customer TLS needs a port they can reach.
pub async fn start_with_health(
    config: BranchConfig,
    customer: TcpListener,
    peer: TcpListener,
    health_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<RunningBranch, BranchError> {
    if !config.members.contains_key(&config.id) {
        return Err(BranchError::NotAMember {
            id: config.id,
            members: config
                .members
                .keys()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .join(","),
        });
    }
    let customer_addr = customer.local_addr().map_err(|source| BranchError::Listen {
        what: "customer API",
        source,
    })?;
    let peer_addr = peer.local_addr().map_err(|source| BranchError::Listen {
        what: "peer API",
        source,
    })?;

    let storage = match &config.data_dir {
        None => Storage::in_memory(config.id, config.initial_balance),
        Some(dir) => {
            let (dir, id, balance) = (dir.clone(), config.id, config.initial_balance);
            tokio::task::spawn_blocking(move || Storage::open(&dir, id, balance))
                .await
                .map_err(|e| BranchError::Start(format!("opening the data directory: {e}")))??
        }
    };
    let state = storage.state.clone();
    let log = storage.log.clone();
    let mut peers = PeerChannels::new(
        config.id,
        Duration::from_secs(2),
        config.members.clone(),
        config.tls.peer.clone(),
    );
    // Learners get entries with their commit attached (one message per write instead of two)
    // only when the log lives in memory: with a data directory a learner fsyncs what it
    // appends, and holding its entries until the commit would put that fsync after the commit
    // instead of beside the voters' (see replication::piggyback). Idle learners get entries in
    // batches either way (replication::demand).
    peers = peers
        .with_replica(state.clone(), config.data_dir.is_none())
        .with_read_lease(config.timing.read_lease());
    let raft = Raft::new(
        config.id,
        Arc::new(raft_config(config.timing)?),
        peers.clone(),
        storage.log,
        storage.state,
    )
    .await
    .map_err(|e| BranchError::Start(e.to_string()))?;
    let branch = Branch::new(&config, raft, state, log, peers);
    if branch.withholding_votes() {
        tracing::info!(
            branch = config.id,
            "the data directory is empty: not voting until caught up with a leader (unless the cluster is forming)"
        );
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    // Liveness: the process serves gRPC. Readiness ("", "readiness", and the Bank service):
    // the branch can answer linearizably; not before it has caught up.
    health.set_service_status(LIVENESS, ServingStatus::Serving).await;
    set_readiness(config.id, &health, ServingStatus::NotServing).await;
    metrics::register_branch(&branch);

    let (ready_tx, ready_rx) = watch::channel(false);
    let task = tokio::spawn(serve(
        config,
        branch.clone(),
        Listeners {
            customer,
            peer,
            health: health_listener,
        },
        health,
        health_service,
        ready_tx,
        shutdown.clone(),
    ));
    Ok(RunningBranch {
        branch,
        customer_addr,
        peer_addr,
        ready: ready_rx,
        shutdown,
        task,
    })
}

/// Starts a branch and runs it until `shutdown` is cancelled (the library entry point for one
/// branch process).
pub async fn run(
    config: BranchConfig,
    customer: TcpListener,
    peer: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), BranchError> {
    start(config, customer, peer, shutdown).await?.join().await
}

/// A branch's listeners.
struct Listeners {
    customer: TcpListener,
    peer: TcpListener,
    health: Option<TcpListener>,
}

/// The customer listener's services, health and server reflection beside the customer API,
/// with the limits every branch applies (`examples/grpc_ceiling` serves its no-op bank through
/// it too, so its calibration pays what a branch pays).
pub fn customer_router<B: Bank, H: Health>(builder: Server, health: HealthServer<H>, bank: B) -> Router {
    // Reflection lists `Bank` and `grpc.health.v1.Health` with their messages, so grpcurl,
    // grpcui or Postman can call a branch without the .proto files (v1, and v1alpha for older
    // clients). The peer API is not listed. Only a defect in the compiled-in descriptors could
    // make it fail to build (`tests/customer_api.rs` would show it); the API does not need it.
    // Built once per process and shared: decoding the descriptors for each of a local
    // cluster's branches was ~6 % of the CPU time of starting 50 of them.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::bank::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    static REFLECTION_V1: OnceLock<Box<dyn Any + Send + Sync>> = OnceLock::new();
    static REFLECTION_V1ALPHA: OnceLock<Box<dyn Any + Send + Sync>> = OnceLock::new();
    builder
        // Bounded work per connection: past the limit a request is refused at once with
        // RESOURCE_EXHAUSTED (retryable) instead of queueing without bound.
        .concurrency_limit_per_connection(MAX_CUSTOMER_REQUESTS_PER_CONNECTION)
        .load_shed(true)
        .add_service(health)
        .add_optional_service(built_once(&REFLECTION_V1, || reflection().build_v1().ok()))
        .add_optional_service(built_once(&REFLECTION_V1ALPHA, || reflection().build_v1alpha().ok()))
        .add_service(
            BankServer::new(bank)
                .max_decoding_message_size(MAX_CUSTOMER_MESSAGE)
                .max_encoding_message_size(MAX_CUSTOMER_MESSAGE),
        )
}

/// The value `make` returns, made on the first call and cloned after that. (`cell` holds it as
/// `Any` because a static cannot name the type: tonic-reflection returns an opaque one.)
fn built_once<T: Clone + Send + Sync + 'static>(
    cell: &OnceLock<Box<dyn Any + Send + Sync>>,
    make: impl FnOnce() -> T,
) -> T {
    if let Some(built) = cell.get().and_then(|value| value.downcast_ref::<T>()) {
        return built.clone();
    }
    let built = make();
    let _ = cell.set(Box::new(built.clone()));
    built
}

async fn serve(
    config: BranchConfig,
    branch: Branch,
    listeners: Listeners,
    health: tonic_health::server::HealthReporter,
    health_service: HealthServer<impl Health>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> Result<(), BranchError> {
    let Listeners {
        customer,
        peer,
        health: health_listener,
    } = listeners;
    // Accepted sockets need nodelay explicitly: serve_with_incoming ignores the builder's
    // setting, and Nagle's algorithm adds ~40 ms to small replies. TLS, when configured, is
    // done by `Incoming` with the certificates current at each handshake (transport::tls).
    let customer_incoming = Incoming::new(
        TcpIncoming::from(customer).with_nodelay(Some(true)),
        config.tls.customer.clone(),
        config.id,
        "customer",
    );
    let peer_incoming = Incoming::new(
        TcpIncoming::from(peer).with_nodelay(Some(true)),
        config.tls.peer.clone(),
        config.id,
        "peer",
    );

    let customer_stop = CancellationToken::new();
    let peer_stop = CancellationToken::new();
    let raft_stopping = CancellationToken::new();
    let customer_server = tokio::spawn(
        customer_router(
            Server::builder(),
            health_service.clone(),
            BankService::new(branch.clone()),
        )
        .serve_with_incoming_shutdown(customer_incoming, customer_stop.clone().cancelled_owned()),
    );
    let peer_server = tokio::spawn(
        Server::builder()
            .add_service(
                PeerServer::new(PeerService::new(branch.clone(), raft_stopping.clone()))
                    .max_decoding_message_size(MAX_PEER_MESSAGE)
                    .max_encoding_message_size(MAX_PEER_MESSAGE),
            )
            .serve_with_incoming_shutdown(peer_incoming, peer_stop.clone().cancelled_owned()),
    );
    // The probe port lives as long as the process: liveness must answer during the drain.
    let health_stop = CancellationToken::new();
    let health_server = health_listener.map(|listener| {
        tokio::spawn(
            Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    health_stop.clone().cancelled_owned(),
                ),
        )
    });

    let background = CancellationToken::new();
    let membership_task = tokio::spawn(manage_membership(config.clone(), branch.clone(), background.clone()));
    let election_task = tokio::spawn(campaign(branch.clone(), config.timing, background.clone()));
    let records_task = config.standalone.then(|| {
        let (branch, stop) = (branch.clone(), background.clone());
        tokio::spawn(async move { branch.record_query_answers(stop).await })
    });
    let readiness_task = tokio::spawn(await_readiness(
        branch.clone(),
        health.clone(),
        ready,
        background.clone(),
    ));
    // Renewed certificates are picked up while the branch runs (transport::tls).
    let tls_tasks: Vec<_> = [("peer", &config.tls.peer), ("customer", &config.tls.customer)]
        .into_iter()
        .filter_map(|(what, dir)| {
            let follow = dir
                .clone()?
                .follow(config.id, what, config.tls.reload_every, background.clone());
            Some(tokio::spawn(follow))
        })
        .collect();

    // Stop when asked, or when Raft itself stopped (a storage write or sync failed: openraft
    // stops rather than go on with state it may not have persisted). A branch whose Raft is
    // dead can never serve again, so it drains and the process exits non-zero for a restart.
    let fatal = tokio::select! {
        _ = shutdown.cancelled() => None,
        fatal = raft_stopped(branch.raft()) => Some(fatal),
    };
    match &fatal {
        None => tracing::info!(
            branch = config.id,
            "shutting down: NOT_SERVING, draining customer requests"
        ),
        Some(fatal) => tracing::error!(
            branch = config.id,
            error = %fatal,
            "Raft stopped on its own: NOT_SERVING, draining, then exiting"
        ),
    }
    // Readiness goes first, while the listener still answers, so load balancers and probes
    // stop sending customers here before the drain; liveness stays SERVING until the end.
    set_readiness(config.id, &health, ServingStatus::NotServing).await;
    background.cancel();
    let _ = membership_task.await;
    for task in tls_tasks {
        let _ = task.await;
    }
    let _ = readiness_task.await;
    let _ = election_task.await;
    if let Some(task) = records_task {
        let _ = task.await;
    }
    // Drain customers first (their requests need consensus), hand the leadership over, then
    // stop Raft, then peers (the hand-off needs them).
    customer_stop.cancel();
    let customer_result = customer_server.await;
    if config.standalone && fatal.is_none() {
        // Answers given up to the drain's end go into the log while the leader still leads.
        let deadline = tokio::time::Instant::now() + config.request_timeout.min(RECORD_AT_STOP);
        let unrecorded = branch.record_pending_answers(deadline).await;
        if unrecorded > 0 {
            tracing::warn!(
                branch = config.id,
                unrecorded,
                "stopping with query answers not recorded: a re-run of those queries gets a new answer"
            );
        }
        log_hand_off(config.id, branch.hand_off_leadership().await);
    }
    raft_stopping.cancel();
    if let Err(e) = branch.raft().shutdown().await {
        tracing::warn!(branch = config.id, error = %e, "Raft did not stop cleanly");
    }
    peer_stop.cancel();
    let peer_result = peer_server.await;
    health_stop.cancel();
    let mut results = vec![customer_result, peer_result];
    if let Some(server) = health_server {
        results.push(server.await);
    }
    for result in results {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BranchError::Serve(e)),
            Err(e) => return Err(BranchError::Start(format!("server task failed: {e}"))),
        }
    }
    metrics::unregister_branch(config.id);
    tracing::debug!(branch = config.id, "stopped");
    match fatal {
        None => Ok(()),
        Some(fatal) => Err(BranchError::RaftStopped(fatal)),
    }
}

/// How long a stopping branch tries to record its last query answers.
const RECORD_AT_STOP: Duration = Duration::from_secs(5);

fn log_hand_off(branch: u64, outcome: HandOff) {
    match outcome {
        HandOff::NotLeader | HandOff::NoOtherVoter => {}
        HandOff::Moved { to, after } => tracing::info!(
            branch,
            to,
            after_ms = after.as_secs_f64() * 1e3,
            "handed the leadership over"
        ),
        HandOff::Failed(why) => tracing::warn!(
            branch,
            reason = %why,
            "leadership hand-off failed: the voters elect a leader after the election timeout"
        ),
    }
}

/// Resolves when Raft's core has stopped (its metrics carry the fatal error), with the error.
async fn raft_stopped(raft: &Raft) -> String {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "Raft's metrics channel closed".into();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn built_once_makes_the_value_once_and_clones_it() {
        static CELL: OnceLock<Box<dyn Any + Send + Sync>> = OnceLock::new();
        let made = AtomicUsize::new(0);
        let make = || {
            made.fetch_add(1, Ordering::SeqCst);
            Arc::new(String::from("descriptors"))
        };
        let first = built_once(&CELL, make);
        let second = built_once(&CELL, make);
        assert_eq!(made.load(Ordering::SeqCst), 1);
        assert!(Arc::ptr_eq(&first, &second));
    }
}
