//! Many branches in one process on loopback: what `distbank run` and `distbank server` start,
//! and what the integration tests use.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
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
}

/// Branches running in this process.
pub struct LocalCluster {
    branches: Vec<RunningBranch>,
    shutdown: CancellationToken,
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
            let customer = bind(id, SocketAddr::new(options.host, customer_port)).await?;
            let peer = bind(id, SocketAddr::new(options.host, 0)).await?;
            let peer_addr = peer.local_addr().map_err(|source| ClusterError::Listen {
                id,
                addr: SocketAddr::new(options.host, 0),
                source,
            })?;
            members.insert(id, peer_addr.to_string());
            listeners.push((id, customer, peer));
        }
        let shutdown = CancellationToken::new();
        let mut branches = Vec::with_capacity(listeners.len());
        for (id, customer, peer) in listeners {
            let config = BranchConfig {
                id,
                initial_balance,
                members: members.clone(),
                voters: options.voters,
                timing: options.timing,
                request_timeout: options.request_timeout,
                data_dir: options.data_dir.as_ref().map(|dir| dir.join(format!("branch-{id}"))),
                tls: Default::default(),
            };
            let running = branch::start(config, customer, peer, shutdown.child_token())
                .await
                .map_err(|source| ClusterError::Branch { id, source })?;
            branches.push(running);
        }
        Ok(LocalCluster { branches, shutdown })
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

    /// Stops every branch and waits until they have shut down.
    pub async fn shutdown(self) -> Result<(), ClusterError> {
        self.shutdown.cancel();
        let mut first_error = None;
        for running in self.branches {
            let id = running.branch.id();
            if let Err(source) = running.join().await {
                first_error.get_or_insert(ClusterError::Branch { id, source });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn bind(id: NodeId, addr: SocketAddr) -> Result<TcpListener, ClusterError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ClusterError::Listen { id, addr, source })
}
