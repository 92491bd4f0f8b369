//! Raft's network: one lazily connected tonic channel per peer, re-used by every RPC.
//!
//! Channels resolve the peer's address again on every reconnect, so a restarted peer with a
//! new IP behind the same DNS name is found without help.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, ClientTlsConfig};

use super::{NodeId, TypeConfig, codec};
use crate::proto::peer::RaftPayload;
use crate::proto::peer::peer_client::PeerClient;
use crate::transport::{self, TlsError};

/// Largest message accepted from a peer (snapshots are sent in chunks well below this).
pub const MAX_PEER_MESSAGE: usize = 64 * 1024 * 1024;

/// Cached channels to peers, keyed by node id and address. Shared by Raft's network and by
/// the branch (forwarding writes, read-index requests).
#[derive(Debug, Clone, Default)]
pub struct PeerChannels {
    /// The branch these channels belong to (for its peer metrics).
    owner: NodeId,
    channels: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
    /// This branch's own configured peer addresses. They win over the address recorded in the
    /// replicated membership, which was written by whichever branch added the member and, with
    /// a data directory, outlives configuration changes (a renamed Service, a new port).
    configured: Arc<BTreeMap<NodeId, String>>,
    connect_timeout: Duration,
    /// Mutual TLS towards peers, when configured.
    tls: Option<ClientTlsConfig>,
}

impl PeerChannels {
    pub fn new(
        owner: NodeId,
        connect_timeout: Duration,
        configured: BTreeMap<NodeId, String>,
        tls: Option<ClientTlsConfig>,
    ) -> PeerChannels {
        PeerChannels {
            owner,
            channels: Arc::default(),
            configured: Arc::new(configured),
            connect_timeout,
            tls,
        }
    }

    /// The peer client for `target`: at its configured address if it has one, else at `addr`
    /// (host:port) from the membership; the channel is created on first use.
    pub fn client(&self, target: NodeId, addr: &str) -> Result<PeerClient<Channel>, TlsError> {
        let addr = self.configured.get(&target).map_or(addr, String::as_str);
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(&target) {
            Some((known, channel)) if known == addr => channel.clone(),
            _ => {
                let channel = transport::endpoint(addr, self.connect_timeout, self.tls.as_ref())?.connect_lazy();
                channels.insert(target, (addr.to_string(), channel.clone()));
                channel
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE))
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerChannels {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection {
        PeerConnection {
            owner: self.owner,
            target,
            client: self.client(target, &node.addr).map_err(|e| e.to_string()),
        }
    }
}

/// Raft's view of one peer.
pub struct PeerConnection {
    owner: NodeId,
    target: NodeId,
    client: Result<PeerClient<Channel>, String>,
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

/// The error for a call that failed before a Raft answer came back.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &self.client {
            Ok(client) => client.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&TransportError(e.clone())))),
        };
        let mut client = client;
        let data = codec::encode(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        // openraft wraps every one of these calls in its own timeout of the same TTL, so only
        // the server needs telling (no second local timer on the replication hot path).
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::InstallSnapshot => client.install_snapshot(request).await,
        };
        crate::metrics::record_peer(self.owner, self.target, reply.is_ok());
        let reply = reply.map_err(|status| {
            let error = TransportError(format!("{}: {}", status.code(), status.message()));
            match status.code() {
                // Openraft backs off from unreachable peers instead of retrying hot.
                tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
                    RPCError::Unreachable(Unreachable::new(&error))
                }
                _ => RPCError::Network(NetworkError::new(&error)),
            }
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            codec::decode(&reply.into_inner().data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    /// After an unreachable peer: 50 ms, doubling to at most 2 s. Each retry reconnects, and so
    /// resolves the peer's DNS name again (a restarted pod comes back with a new IP).
    fn backoff(&self) -> Backoff {
        Backoff::new(
            (0..).map(|attempt: u32| Duration::from_millis(50u64 << attempt.min(6)).min(Duration::from_secs(2))),
        )
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
