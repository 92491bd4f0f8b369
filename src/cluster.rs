//! Many branches in one process on loopback: what `distbank run` and `distbank server` start,
//! and what the integration tests use.
//!
//! With [`Runtimes::PerCore`] the branches run on one single-threaded tokio runtime per core
//! (started once per process), each branch with all its tasks and connections on one of them,
//! instead of on one work-stealing runtime:
//! on a two-core machine the work-stealing runtime spent most of the second core on moving
//! tasks between threads and waking them (a 5-branch cluster under 64 concurrent clients: one
//! worker thread did 12.9k ops/s on one core, two did 14.9k on two). Branches talk over
//! loopback TCP either way, as pods do, so nothing is shared between the runtimes but the
//! process. For a sequential replay the CLI runs the whole process on one thread instead
//! ([`Runtimes::Shared`] on a current-thread runtime: `--runtimes single`), where every hop
//! of an event's chain of calls is a wake-up on the same thread.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::branch::{self, BranchConfig, BranchError, RunningBranch};
use crate::replication::{NodeId, RaftTiming};

/// How a local cluster is laid out.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub host: IpAddr,
    /// Branch N's customer API listens on `base_port + N`; `None` = ephemeral ports.
    pub base_port: Option<u16>,
    pub voters: usize,
    pub timing: RaftTiming,
    pub request_timeout: Duration,
    /// Durable branches: branch N keeps its consensus state in `data_dir/branch-N`.
    pub data_dir: Option<PathBuf>,
    /// Where the branches' tasks run.
    pub runtimes: Runtimes,
}

/// Where a local cluster's branches run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Runtimes {
    /// Spread over single-threaded runtimes, one per core (see the module docs).
    #[default]
    PerCore,
    /// All on the caller's runtime (in the CLI, the process's work-stealing runtime).
    Shared,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            host: IpAddr::from([127, 0, 0, 1]),
            base_port: None,
            voters: 3,
            timing: RaftTiming::default(),
            request_timeout: Duration::from_secs(10),
            data_dir: None,
            runtimes: Runtimes::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("branch {id}: cannot listen on {addr}: {source}")]
    Listen {
        id: NodeId,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("branch {id}: customer port {base} + {id} is beyond 65535")]
    PortOutOfRange { id: NodeId, base: u16 },
    #[error("branch {id}: {source}")]
    Branch {
        id: NodeId,
        #[source]
        source: BranchError,
    },
    #[error("branches not ready after {seconds:.1} s: {waiting}")]
    NotReady { seconds: f64, waiting: String },
    #[error("cannot start the runtime threads for the branches: {0}")]
    Runtime(String),
    #[error("branch {id}: its start-up task ended without an answer: {source}")]
    StartAborted {
        id: NodeId,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Branches running in this process.
pub struct LocalCluster {
    branches: Vec<RunningBranch>,
    shutdown: CancellationToken,
    /// The runtimes the branches run on; `None`: the caller's.
    cores: Option<&'static [tokio::runtime::Handle]>,
}

impl LocalCluster {
    /// Binds every listener first (so all peer addresses are known), then starts the branches.
    pub async fn start(
        branch_ids: &[NodeId],
        initial_balance: u64,
        options: &ClusterOptions,
    ) -> Result<LocalCluster, ClusterError> {
        let mut listeners = Vec::with_capacity(branch_ids.len());
        let mut members = BTreeMap::new();
        for &id in branch_ids {
            let customer_port = match options.base_port {
                None => 0,
                Some(base) => {
                    u16::try_from(u64::from(base) + id).map_err(|_| ClusterError::PortOutOfRange { id, base })?
                }
            };
            // Plain std listeners: each becomes a tokio listener on the runtime its branch runs
            // on, so its readiness events go to that runtime's thread.
            let customer_addr = SocketAddr::new(options.host, customer_port);
            let customer = bind(customer_addr).map_err(|source| ClusterError::Listen {
                id,
                addr: customer_addr,
                source,
            })?;
            let any_port = SocketAddr::new(options.host, 0);
            let peer = bind(any_port).map_err(|source| ClusterError::Listen {
                id,
                addr: any_port,
                source,
            })?;
            let peer_addr = peer.local_addr().map_err(|source| ClusterError::Listen {
                id,
                addr: SocketAddr::new(options.host, 0),
                source,
            })?;
            members.insert(id, peer_addr.to_string());
            listeners.push((id, customer, peer));
        }
        let cores = match options.runtimes {
            Runtimes::Shared => None,
            Runtimes::PerCore => Some(per_core_runtimes().map_err(ClusterError::Runtime)?),
        };
        let shutdown = CancellationToken::new();
        let mut cluster = LocalCluster {
            branches: Vec::with_capacity(listeners.len()),
            shutdown,
            cores,
        };
        for (n, (id, customer, peer)) in listeners.into_iter().enumerate() {
            let config = BranchConfig {
                id,
                initial_balance,
                members: members.clone(),
                voters: options.voters,
                timing: options.timing,
                request_timeout: options.request_timeout,
                data_dir: options.data_dir.as_ref().map(|dir| dir.join(format!("branch-{id}"))),
                tls: Default::default(),
                // All stop together: nobody to hand over to.
                standalone: false,
            };
            let shutdown = cluster.shutdown.child_token();
            let start = async move {
                // As a tokio listener on this runtime; the error names the address.
                let adopt = |listener: std::net::TcpListener| {
                    let addr = listener
                        .local_addr()
                        .unwrap_or_else(|_| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
                    TcpListener::from_std(listener).map_err(|source| (addr, source))
                };
                let listen_error = |(addr, source)| ClusterError::Listen { id, addr, source };
                let customer = adopt(customer).map_err(listen_error)?;
                let peer = adopt(peer).map_err(listen_error)?;
                branch::start(config, customer, peer, shutdown)
                    .await
                    .map_err(|source| ClusterError::Branch { id, source })
            };
            let running = match cluster.spawn(n, start).await {
                Ok(running) => running?,
                Err(source) => return Err(ClusterError::StartAborted { id, source }),
            };
            cluster.branches.push(running);
        }
        Ok(cluster)
    }

    /// Runs `task` on the runtime of the `n`-th branch (the caller's without per-core
    /// runtimes): work that talks to a branch a lot, such as load-generating clients, keeps its
    /// connections on one thread that way too.
    pub fn spawn<F>(&self, n: usize, task: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.cores {
            Some(cores) if !cores.is_empty() => cores[n % cores.len()].spawn(task),
            _ => tokio::spawn(task),
        }
    }

    /// Tasks alive on the per-core runtimes (every cluster's, not only this one's).
    pub fn per_core_tasks() -> usize {
        per_core_runtimes().map_or(0, |cores| cores.iter().map(|h| h.metrics().num_alive_tasks()).sum())
    }

    /// How many runtimes the branches are spread over (1: the caller's).
    pub fn runtimes(&self) -> usize {
        self.cores.map_or(1, |cores| cores.len().max(1))
    }

    /// Waits until every branch reports SERVING.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ClusterError> {
        let all = futures::future::join_all(self.branches.iter().map(|b| b.ready()));
        if tokio::time::timeout(timeout, all).await.is_ok() {
            return Ok(());
        }
        let waiting: Vec<String> = self
            .branches
            .iter()
            .filter(|b| !b.is_ready())
            .map(|b| b.branch.id().to_string())
            .collect();
        Err(ClusterError::NotReady {
            seconds: timeout.as_secs_f64(),
            waiting: waiting.join(","),
        })
    }

    pub fn branches(&self) -> &[RunningBranch] {
        &self.branches
    }

    /// Customer-API address of every branch.
    pub fn customer_addrs(&self) -> BTreeMap<NodeId, SocketAddr> {
        self.branches.iter().map(|b| (b.branch.id(), b.customer_addr)).collect()
    }

    /// The customer addresses as the replay's address source (`http://` URLs).
    pub fn customer_addresses(&self) -> crate::discovery::Addresses {
        crate::discovery::Addresses::Static(
            self.customer_addrs()
                .into_iter()
                .map(|(id, addr)| (id, format!("http://{addr}")))
                .collect(),
        )
    }

    /// Every branch's local balance (after a write, all converge to one value).
    pub fn local_balances(&self) -> BTreeMap<NodeId, u64> {
        self.branches
            .iter()
            .map(|b| (b.branch.id(), b.branch.local_balance()))
            .collect()
    }

    /// Waits until every replica has applied everything any of them has applied, so all show
    /// one balance (and, with tracing, every apply span exists before the spans are flushed).
    /// False if `timeout` passed first.
    pub async fn wait_converged(&self, timeout: Duration) -> bool {
        // The leader sends idle learners what it holds for them now, not after the hold.
        self.branches.iter().for_each(|b| b.branch.flush_learners());
        let Some(target) = self.branches.iter().filter_map(|b| b.branch.last_applied_index()).max() else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let all = futures::future::join_all(self.branches.iter().map(|b| b.branch.wait_applied(target, deadline)));
        all.await.iter().all(Result::is_ok)
    }

    /// The token that stops every branch; cancel it from a signal handler.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops every branch and waits until they have shut down. The leader goes first: once
    /// its Raft has stopped, nothing replicates to the others while they stop (a stopping
    /// branch refuses Raft's messages, and openraft logs each refused one as an error).
    pub async fn shutdown(mut self) -> Result<(), ClusterError> {
        let (leaders, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.branches)
            .into_iter()
            .partition(|running| running.branch.raft().metrics().borrow().state.is_leader());
        leaders.iter().for_each(RunningBranch::stop);
        let mut first_error = None;
        join_all_in_order(leaders, &mut first_error).await;
        self.shutdown.cancel();
        join_all_in_order(others, &mut first_error).await;
        first_error.map_or(Ok(()), Err)
    }
}

/// Waits for each branch of `group` to stop; keeps the first error.
async fn join_all_in_order(group: Vec<RunningBranch>, first_error: &mut Option<ClusterError>) {
    for running in group {
        let id = running.branch.id();
        if let Err(source) = running.join().await {
            first_error.get_or_insert(ClusterError::Branch { id, source });
        }
    }
}

impl Drop for LocalCluster {
    /// A cluster dropped without [`LocalCluster::shutdown`] (an error path) still stops.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A plain std listener, non-blocking (see [`LocalCluster::start`] for why not a tokio one).
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The process's single-threaded runtimes, one per core it may use, each driven by a thread
/// of its own for the life of the process: started on first use, shared by every local
/// cluster after that (a thread's memory arena and caches stay warm from one cluster to the
/// next; between clusters the threads sleep).
fn per_core_runtimes() -> Result<&'static [tokio::runtime::Handle], String> {
    static RUNTIMES: std::sync::OnceLock<Result<Vec<tokio::runtime::Handle>, String>> = std::sync::OnceLock::new();
    let runtimes = RUNTIMES.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (0..cores)
            .map(|n| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let handle = runtime.handle().clone();
                std::thread::Builder::new()
                    .name(format!("distbank-core-{n}"))
                    .spawn(move || runtime.block_on(std::future::pending::<()>()))
                    .map_err(|e| e.to_string())?;
                Ok(handle)
            })
            .collect()
    });
    runtimes.as_deref().map_err(Clone::clone)
}
