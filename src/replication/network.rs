//! Raft's network: one lazily connected tonic channel per peer, re-used by every RPC.
//! AppendEntries (replication and heartbeats, the bulk of peer traffic) travel on one
//! long-lived stream per peer: a DATA frame each way per message instead of a unary call's
//! headers, trailers and server task, which is most of a call's cost on loopback. Learners
//! get new entries together with their commit ([`super::piggyback`]); learners no customer is
//! waiting on get them in batches ([`super::demand`]).
//!
//! Channels resolve the peer's address again on every reconnect, so a restarted peer with a
//! new IP behind the same DNS name is found without help. With peer TLS, a channel made before
//! the certificates changed on disk is replaced on its next use ([`crate::transport::CertDir`]).

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
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::demand::{self, Demand, Wanted};
use super::lease::LeaseClock;
use super::piggyback::{LearnerLink, Piggyback};
use super::store::StateMachine;
use super::{NodeId, TypeConfig, codec};
use crate::proto::peer::RaftPayload;
use crate::proto::peer::peer_client::PeerClient;
use crate::transport::{self, CertDir, TlsError};

/// Largest message accepted from a peer (snapshots are sent in chunks well below this).
pub const MAX_PEER_MESSAGE: usize = 64 * 1024 * 1024;

/// Idle AppendEntries streams kept per peer for the next connection to it (see
/// [`SpareStreams`]). Read rounds run one at a time, but a round ends on a quorum while its
/// heartbeat to a slower voter is still out, so the next round's needs another stream: with
/// 5 branches under load, 2 spares left one round in ~20 opening a stream, 4 one in ~80.
const SPARE_STREAMS_PER_PEER: usize = 4;

/// Idle AppendEntries streams left by connections openraft dropped, by peer, with the address
/// each was opened to. Openraft makes a new connection for every read round's quorum check
/// (one heartbeat to each voter) and drops it after that one call; without the spares each
/// round would open and end a stream per voter, which costs several times the heartbeat
/// itself and, under a mix of reads and writes, about a fifth of all CPU.
type SpareStreams = Arc<Mutex<HashMap<NodeId, Vec<(String, AppendStream)>>>>;

/// A peer's channel, with the address and the TLS generation
/// ([`CertDir::client_config`]) it was made for.
#[derive(Debug, Clone)]
struct CachedChannel {
    address: String,
    tls_generation: u64,
    channel: Channel,
}

/// Cached channels to peers, keyed by node id and address. Shared by Raft's network and by
/// the branch (forwarding writes, read-index requests).
#[derive(Debug, Clone, Default)]
pub struct PeerChannels {
    /// The branch these channels belong to (for its peer metrics).
    owner: NodeId,
    channels: Arc<Mutex<HashMap<NodeId, CachedChannel>>>,
    /// This branch's own configured peer addresses. They win over the address recorded in the
    /// replicated membership, which was written by whichever branch added the member and, with
    /// a data directory, outlives configuration changes (a renamed Service, a new port).
    configured: Arc<BTreeMap<NodeId, String>>,
    connect_timeout: Duration,
    /// Mutual TLS towards peers, when configured.
    tls: Option<Arc<CertDir>>,
    /// This branch's replica, for telling learners apart and, with logs in memory, sending
    /// them their entries with the commit attached.
    piggyback: Option<Piggyback>,
    /// Which learners a customer waits on; the others get entries in batches...
    demand: Arc<Demand>,
    /// ...at most this far apart (bounded further by half of openraft's call timeout).
    linger: Duration,
    spare_streams: SpareStreams,
    /// What the voters' replies prove about this branch's leadership (see [`super::lease`]).
    lease: Arc<LeaseClock>,
}

impl PeerChannels {
    pub fn new(
        owner: NodeId,
        connect_timeout: Duration,
        configured: BTreeMap<NodeId, String>,
        tls: Option<Arc<CertDir>>,
    ) -> PeerChannels {
        PeerChannels {
            owner,
            channels: Arc::default(),
            configured: Arc::new(configured),
            connect_timeout,
            tls,
            piggyback: None,
            demand: Arc::default(),
            linger: demand::LINGER,
            spare_streams: Arc::default(),
            lease: Arc::default(),
        }
    }

    /// Grants the leader read leases of `duration` (see [`super::lease`]); without this call
    /// every linearizable read takes a quorum round.
    pub fn with_read_lease(mut self, duration: Duration) -> PeerChannels {
        self.lease = Arc::new(LeaseClock::new(duration));
        self
    }

    /// The leader's read lease, as the replies of its peers establish it.
    pub fn lease(&self) -> &LeaseClock {
        &self.lease
    }

    /// Holds an idle learner's acknowledgement at most `linger` instead of [`demand::LINGER`].
    pub fn with_learner_linger(mut self, linger: Duration) -> PeerChannels {
        self.linger = linger;
        self
    }

    /// Knows learners from `replica` (this branch's own): idle ones get their entries in
    /// batches ([`super::demand`]), and with `attach_commits` every learner gets its entries
    /// with the commit attached ([`super::piggyback`]).
    pub fn with_replica(mut self, replica: StateMachine, attach_commits: bool) -> PeerChannels {
        self.piggyback = Some(Piggyback::new(replica, attach_commits));
        self
    }

    /// Which learners a customer waits on, as this branch learns it while it leads.
    pub fn demand(&self) -> &Demand {
        &self.demand
    }

    /// The peer client for `target`: at its configured address if it has one, else at `addr`
    /// (host:port) from the membership; the channel is created on first use, and again after
    /// the TLS certificates changed (its connections keep their old session until they end).
    pub fn client(&self, target: NodeId, addr: &str) -> Result<PeerClient<Channel>, TlsError> {
        let addr = self.address(target, addr);
        let tls = self.tls.as_ref().and_then(|tls| tls.client_config());
        let generation = tls.as_ref().map_or(0, |(generation, _)| *generation);
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(&target) {
            Some(cached) if cached.address == addr && cached.tls_generation == generation => cached.channel.clone(),
            _ => {
                let tls = tls.as_ref().map(|(_, config)| config);
                let endpoint = transport::endpoint(addr, self.connect_timeout, tls)?
                    .http2_keep_alive_interval(transport::PEER_KEEPALIVE)
                    .keep_alive_timeout(transport::PEER_KEEPALIVE);
                let channel = transport::connect_lazy(&endpoint);
                let cached = CachedChannel {
                    address: addr.to_string(),
                    tls_generation: generation,
                    channel: channel.clone(),
                };
                channels.insert(target, cached);
                channel
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE))
    }

    /// Where `target` is reached: its configured address if it has one, else `addr` from the
    /// membership.
    fn address<'a>(&'a self, target: NodeId, addr: &'a str) -> &'a str {
        self.configured.get(&target).map_or(addr, String::as_str)
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerChannels {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection {
        PeerConnection {
            owner: self.owner,
            target,
            address: self.address(target, &node.addr).to_string(),
            channels: self.clone(),
            append_stream: None,
            spare_streams: self.spare_streams.clone(),
            unary_only: false,
            piggyback: self.piggyback.clone(),
            learner: LearnerLink::default(),
            wanted: self.demand.watch(target),
            linger: self.linger,
            lease: self.lease.clone(),
        }
    }
}

/// Raft's view of one peer.
pub struct PeerConnection {
    owner: NodeId,
    target: NodeId,
    /// The address `client` connects to (spare streams are only re-used towards it).
    address: String,
    /// Where the client for each call comes from (a new channel after a TLS change).
    channels: PeerChannels,
    /// The open AppendEntries stream, between calls. A call takes it out and puts it back only
    /// after its reply arrived, so a call that failed or was abandoned (openraft's timeout
    /// drops it) leaves no stream whose next reply would answer the wrong request.
    append_stream: Option<AppendStream>,
    /// Where this connection leaves its idle stream when openraft drops it, and takes one
    /// from when it has none.
    spare_streams: SpareStreams,
    /// The peer does not know the streaming call (an older release during a rolling upgrade).
    unary_only: bool,
    piggyback: Option<Piggyback>,
    /// What the peer last acknowledged, while it is a learner.
    learner: LearnerLink,
    /// Whether a customer waits on the peer, while it is a learner.
    wanted: Wanted,
    linger: Duration,
    lease: Arc<LeaseClock>,
}

struct AppendStream {
    requests: mpsc::Sender<RaftPayload>,
    replies: tonic::Streaming<RaftPayload>,
}

impl std::fmt::Debug for AppendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendStream")
            .field("closed", &self.requests.is_closed())
            .finish_non_exhaustive()
    }
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
    /// A client to the peer on the current channel.
    fn client(&self) -> Result<PeerClient<Channel>, String> {
        self.channels
            .client(self.target, &self.address)
            .map_err(|e| e.to_string())
    }

    /// One AppendEntries on the stream, opened first if there is none.
    async fn call_on_stream(&mut self, data: Vec<u8>) -> Result<RaftPayload, tonic::Status> {
        let (stream, spare) = match self.append_stream.take() {
            Some(stream) => (stream, false),
            None => match self.take_spare_stream() {
                Some(stream) => (stream, true),
                None => (self.open_stream().await?, false),
            },
        };
        // Kept for a second try on a new stream (AppendEntries may be repeated safely).
        let retry = spare.then(|| data.clone());
        let (stream, reply) = match (self.exchange(stream, RaftPayload { data }).await, retry) {
            // A spare stream can have ended while it sat idle without its sender noticing yet
            // (the peer restarted): one more try on a stream of this connection's own.
            (Err(_), Some(data)) => {
                let fresh = self.open_stream().await?;
                self.exchange(fresh, RaftPayload { data }).await?
            }
            (result, _) => result?,
        };
        self.append_stream = Some(stream);
        Ok(reply)
    }

    /// Sends `message` on `stream` and waits for its reply.
    async fn exchange(
        &self,
        mut stream: AppendStream,
        message: RaftPayload,
    ) -> Result<(AppendStream, RaftPayload), tonic::Status> {
        if let Err(mpsc::error::SendError(message)) = stream.requests.send(message).await {
            // The stream had closed before this message (the peer restarted or ended it), so
            // the peer never saw it: send it on a new stream instead of failing the call.
            stream = self.open_stream().await?;
            if stream.requests.send(message).await.is_err() {
                return Err(tonic::Status::unavailable("the AppendEntries stream closed"));
            }
        }
        match stream.replies.message().await? {
            Some(reply) => Ok((stream, reply)),
            None => Err(tonic::Status::unavailable("the peer ended the AppendEntries stream")),
        }
    }

    /// An idle stream another connection to the same peer and address left behind.
    fn take_spare_stream(&self) -> Option<AppendStream> {
        let mut spares = self.spare_streams.lock().unwrap_or_else(|p| p.into_inner());
        let spares = spares.get_mut(&self.target)?;
        // Streams to an old address or already closed (the peer restarted) are dropped here.
        while let Some((address, stream)) = spares.pop() {
            if address == self.address && !stream.requests.is_closed() {
                return Some(stream);
            }
        }
        None
    }

    async fn open_stream(&self) -> Result<AppendStream, tonic::Status> {
        let mut client = self.client().map_err(tonic::Status::unavailable)?;
        // One message in flight at a time, so one slot is enough. No deadline on the stream
        // itself: it lives as long as the leader's replication to this peer; each message is
        // bounded by openraft's timeout around the call.
        let (requests, outgoing) = mpsc::channel(1);
        let replies = client
            .append_entries_stream(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        Ok(AppendStream { requests, replies })
    }

    async fn append_on_stream(
        &mut self,
        request: &AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let data = codec::encode(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = match self.call_on_stream(data).await {
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!(
                    branch = self.owner,
                    peer = self.target,
                    "peer has no AppendEntries stream (an older release): using unary calls"
                );
                self.unary_only = true;
                return self.call(Rpc::AppendEntries, request, option).await;
            }
            reply => reply,
        };
        crate::metrics::record_peer(self.owner, self.target, reply.is_ok());
        let reply = reply.map_err(transport_error)?;
        self.decode_reply(&reply.data)
    }

    // The error type is openraft's, fixed by the RaftNetwork trait.
    #[allow(clippy::result_large_err)]
    fn decode_reply<Resp, E>(&self, data: &[u8]) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<NodeId, E>> =
            codec::decode(data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

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
        let mut client = self
            .client()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&TransportError(e))))?;
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
        let reply = reply.map_err(transport_error)?;
        self.decode_reply(&reply.into_inner().data)
    }
}

impl Drop for PeerConnection {
    /// The idle stream (none while a call is in flight: a call holds it) goes to the spares.
    fn drop(&mut self) {
        let Some(stream) = self.append_stream.take() else {
            return;
        };
        if stream.requests.is_closed() {
            return;
        }
        let mut spares = self.spare_streams.lock().unwrap_or_else(|p| p.into_inner());
        let spares = spares.entry(self.target).or_default();
        spares.retain(|(address, stream)| *address == self.address && !stream.requests.is_closed());
        if spares.len() < SPARE_STREAMS_PER_PEER {
            spares.push((std::mem::take(&mut self.address), stream));
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // Before anything is sent: the peer's lease runs from when it handles the request.
        let sent = tokio::time::Instant::now();
        let piggyback = self.piggyback.as_ref().filter(|p| p.is_learner(self.target));
        let window = option.hard_ttl() / 4;
        if let Some(piggyback) = piggyback {
            if piggyback.attaches() && self.learner.redundant(&rpc, window) {
                return Ok(AppendEntriesResponse::Success);
            }
            piggyback.attach_commit(&mut rpc, window).await;
        }
        let (learner, attached) = (piggyback.is_some(), piggyback.is_some_and(Piggyback::attaches));
        let reply = if self.unary_only {
            self.call(Rpc::AppendEntries, &rpc, &option).await
        } else {
            self.append_on_stream(&rpc, &option).await
        };
        let delivered = matches!(reply, Ok(AppendEntriesResponse::Success));
        if !learner
            && let Ok(
                AppendEntriesResponse::Success
                | AppendEntriesResponse::PartialSuccess(_)
                | AppendEntriesResponse::Conflict,
            ) = reply
        {
            // Every answer but HigherVote means the peer accepted this leader's vote.
            self.lease.acknowledged(self.target, &rpc.vote, sent);
        }
        if attached {
            self.learner.record(&rpc, delivered);
        }
        if learner
            && delivered
            && let Some(last) = rpc.entries.last()
        {
            // The entries are delivered; holding the answer keeps openraft from sending this
            // learner more until the linger ends or a customer waits on it, and what was
            // appended meanwhile then goes in one request (see replication::demand). Together
            // with the hold above, well inside openraft's timeout around this call. The
            // learner can apply what it got up to the commit sent with it.
            let sent = last.log_id.index.min(rpc.leader_commit.map_or(0, |id| id.index));
            self.wanted
                .linger(sent, self.linger.min(window * 2), demand::GRACE)
                .await;
        }
        reply
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    /// After an unreachable peer: 50 ms, doubling to at most 500 ms. Each retry reconnects, and
    /// so resolves the peer's DNS name again (a restarted pod comes back with a new IP). The cap
    /// is how long a peer that is back may wait for the leader to notice (a restarted branch
    /// is not SERVING before it does), and a retry to a peer that is still down costs one
    /// refused or timed-out connect.
    fn backoff(&self) -> Backoff {
        Backoff::new(
            (0..).map(|attempt: u32| Duration::from_millis(50u64 << attempt.min(4)).min(Duration::from_millis(500))),
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

/// A failed peer call as openraft's error: Unreachable makes it back off from the peer instead
/// of retrying hot, for the same failures a customer would retry (the peer is down,
/// restarting, closing its connections, or out of time).
fn transport_error<E: std::error::Error>(status: tonic::Status) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    let unreachable = crate::transport::is_transient(&status);
    let error = TransportError(format!("{}: {}", status.code(), status.message()));
    if unreachable {
        RPCError::Unreachable(Unreachable::new(&error))
    } else {
        RPCError::Network(NetworkError::new(&error))
    }
}

#[cfg(test)]
mod tests {
    //! The client side of the AppendEntries stream against a peer speaking only the wire
    //! protocol: one stream re-used by every call, a new one after the peer ended it, and unary
    //! calls towards a peer that does not know the stream (an older release).
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::{Stream, StreamExt as _};
    use openraft::storage::RaftStateMachine as _;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, Vote};
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::proto::peer::peer_server::{Peer, PeerServer};
    use crate::proto::peer::{ReadIndexReply, ReadIndexRequest, SubmitReply, SubmitRequest};

    #[derive(Default)]
    struct Counts {
        streams_opened: AtomicUsize,
        streamed: AtomicUsize,
        unary: AtomicUsize,
        /// The commit the last AppendEntries carried.
        last_commit: Mutex<Option<LogId<NodeId>>>,
    }

    struct WirePeer {
        counts: Arc<Counts>,
        /// None: an older release without the stream. Some(n): end each stream after n replies.
        stream_replies: Option<usize>,
    }

    fn answer(counts: &Counts, data: &[u8]) -> Result<RaftPayload, Status> {
        let request: AppendEntriesRequest<TypeConfig> =
            codec::decode(data).map_err(|e| Status::invalid_argument(e.to_string()))?;
        *counts.last_commit.lock().unwrap_or_else(|p| p.into_inner()) = request.leader_commit;
        let reply: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = Ok(AppendEntriesResponse::Success);
        Ok(RaftPayload {
            data: codec::encode(&reply).map_err(|e| Status::internal(e.to_string()))?,
        })
    }

    #[tonic::async_trait]
    impl Peer for WirePeer {
        async fn append_entries(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            self.counts.unary.fetch_add(1, Ordering::SeqCst);
            answer(&self.counts, &request.into_inner().data).map(Response::new)
        }

        type AppendEntriesStreamStream = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send + 'static>>;

        async fn append_entries_stream(
            &self,
            request: Request<Streaming<RaftPayload>>,
        ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
            let Some(limit) = self.stream_replies else {
                return Err(Status::unimplemented("not in this release"));
            };
            self.counts.streams_opened.fetch_add(1, Ordering::SeqCst);
            let counts = self.counts.clone();
            let replies = request.into_inner().take(limit).map(move |message| {
                counts.streamed.fetch_add(1, Ordering::SeqCst);
                answer(&counts, &message?.data)
            });
            Ok(Response::new(Box::pin(replies)))
        }

        async fn vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("vote"))
        }

        async fn pre_vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("pre_vote"))
        }

        async fn timeout_now(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("timeout_now"))
        }

        async fn install_snapshot(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("install_snapshot"))
        }

        async fn submit(&self, _: Request<SubmitRequest>) -> Result<Response<SubmitReply>, Status> {
            Err(Status::unimplemented("submit"))
        }

        async fn read_index(&self, _: Request<ReadIndexRequest>) -> Result<Response<ReadIndexReply>, Status> {
            Err(Status::unimplemented("read_index"))
        }
    }

    /// Serves `peer` on a port-0 listener (bound before this returns, so calls can start).
    async fn serve(peer: WirePeer) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(peer))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }

    /// A wire peer (`stream_replies` as in [`WirePeer`]) with its counts, served.
    async fn serve_counted(stream_replies: Option<usize>) -> (Arc<Counts>, SocketAddr) {
        let counts = Arc::new(Counts::default());
        let addr = serve(WirePeer {
            counts: counts.clone(),
            stream_replies,
        })
        .await;
        (counts, addr)
    }

    /// A wire peer (`stream_replies` as in [`WirePeer`]) and a connection to it.
    async fn connect(stream_replies: Option<usize>) -> (Arc<Counts>, PeerConnection) {
        let channels = PeerChannels::new(1, Duration::from_secs(5), BTreeMap::new(), None);
        connect_from(channels, stream_replies).await
    }

    async fn connect_from(mut channels: PeerChannels, stream_replies: Option<usize>) -> (Arc<Counts>, PeerConnection) {
        let (counts, addr) = serve_counted(stream_replies).await;
        let connection = channels.new_client(2, &BasicNode::new(addr.to_string())).await;
        (counts, connection)
    }

    async fn heartbeat(connection: &mut PeerConnection) -> Result<(), String> {
        let request = AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
        match connection
            .append_entries(request, RPCOption::new(Duration::from_secs(10)))
            .await
        {
            Ok(AppendEntriesResponse::Success) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }

    #[tokio::test]
    async fn every_call_travels_on_one_stream() {
        let (counts, mut connection) = connect(Some(usize::MAX)).await;
        for _ in 0..5 {
            heartbeat(&mut connection).await.expect("heartbeat");
        }
        assert_eq!(counts.streams_opened.load(Ordering::SeqCst), 1);
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 5);
        assert_eq!(counts.unary.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_stream_the_peer_ended_is_replaced() {
        let (counts, mut connection) = connect(Some(2)).await;
        heartbeat(&mut connection).await.expect("first");
        heartbeat(&mut connection).await.expect("second");
        // The peer ended the stream after two replies. Whether the third call notices before
        // it sends (and goes on a new stream at once) or only when the reply does not come
        // (and fails: openraft retries) depends on timing; either way the next call works.
        if let Err(error) = heartbeat(&mut connection).await {
            assert!(error.contains("ended the AppendEntries stream"), "{error}");
        }
        heartbeat(&mut connection).await.expect("on a new stream");
        assert_eq!(counts.streams_opened.load(Ordering::SeqCst), 2);
        assert_eq!(counts.unary.load(Ordering::SeqCst), 0);
    }

    /// Openraft's read rounds: a new connection per round, dropped after its one heartbeat.
    #[tokio::test]
    async fn connections_made_one_after_another_share_one_stream() {
        let mut channels = PeerChannels::new(1, Duration::from_secs(5), BTreeMap::new(), None);
        let (counts, addr) = serve_counted(Some(usize::MAX)).await;
        let node = BasicNode::new(addr.to_string());
        for _ in 0..5 {
            let mut round = channels.new_client(2, &node).await;
            heartbeat(&mut round).await.expect("heartbeat");
        }
        assert_eq!(counts.streams_opened.load(Ordering::SeqCst), 1);
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 5);

        // Two at once cannot share: each call holds its stream until the reply.
        let (mut a, mut b) = (channels.new_client(2, &node).await, channels.new_client(2, &node).await);
        let (first, second) = tokio::join!(heartbeat(&mut a), heartbeat(&mut b));
        first.expect("first");
        second.expect("second");
        assert_eq!(counts.streams_opened.load(Ordering::SeqCst), 2);
        drop((a, b));
        // Both idle streams are kept; connections after that open none.
        for _ in 0..3 {
            let (mut a, mut b) = (channels.new_client(2, &node).await, channels.new_client(2, &node).await);
            let (first, second) = tokio::join!(heartbeat(&mut a), heartbeat(&mut b));
            first.and(second).expect("heartbeats");
        }
        assert_eq!(counts.streams_opened.load(Ordering::SeqCst), 2);
        assert_eq!(counts.unary.load(Ordering::SeqCst), 0);
    }

    /// A spare stream belongs to the address it was opened to: a peer that moved (a new
    /// address in the membership or the configuration) gets a stream of its own.
    #[tokio::test]
    async fn a_spare_stream_is_not_used_towards_another_address() {
        let mut channels = PeerChannels::new(1, Duration::from_secs(5), BTreeMap::new(), None);
        let (old, old_addr) = serve_counted(Some(usize::MAX)).await;
        let (new, new_addr) = serve_counted(Some(usize::MAX)).await;
        let mut before = channels.new_client(2, &BasicNode::new(old_addr.to_string())).await;
        heartbeat(&mut before).await.expect("to the old address");
        drop(before);
        let mut after = channels.new_client(2, &BasicNode::new(new_addr.to_string())).await;
        heartbeat(&mut after).await.expect("to the new address");
        assert_eq!(old.streamed.load(Ordering::SeqCst), 1);
        assert_eq!(new.streams_opened.load(Ordering::SeqCst), 1);
        assert_eq!(new.streamed.load(Ordering::SeqCst), 1);
    }

    /// A stream the peer ended while it was spare is not handed out again.
    #[tokio::test]
    async fn a_spare_stream_the_peer_ended_is_not_reused() {
        let mut channels = PeerChannels::new(1, Duration::from_secs(5), BTreeMap::new(), None);
        let (counts, addr) = serve_counted(Some(1)).await;
        let node = BasicNode::new(addr.to_string());
        for n in 1..=3 {
            // Whether the spare left by the last round is seen closed before the call (and
            // skipped) or only when its reply does not come (and the call tries again on a new
            // stream) depends on timing; either way the heartbeat gets through.
            let mut round = channels.new_client(2, &node).await;
            heartbeat(&mut round).await.expect("heartbeat");
            assert_eq!(counts.streams_opened.load(Ordering::SeqCst), n);
        }
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 3);
        assert_eq!(counts.unary.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_calls() {
        let (counts, mut connection) = connect(None).await;
        for _ in 0..3 {
            heartbeat(&mut connection).await.expect("heartbeat");
        }
        assert_eq!(counts.streams_opened.load(Ordering::SeqCst), 0);
        assert_eq!(counts.unary.load(Ordering::SeqCst), 3);
    }

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn blank(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(index),
            payload: EntryPayload::Blank,
        }
    }

    /// Leader 1's replica, which has applied entry 1: a membership with node 1 as the voter and
    /// node 2 (`learner`) or node 3 as the learner.
    async fn leader_replica(learner: NodeId) -> StateMachine {
        let mut replica = StateMachine::new(1, 0);
        let membership = Membership::new(vec![[1].into()], std::collections::BTreeSet::from([learner]));
        let entry = Entry {
            log_id: log_id(1),
            payload: EntryPayload::Membership(membership),
        };
        replica.apply([entry]).await.expect("apply membership");
        replica
    }

    /// Entries 2..=3 after entry 1, committed up to 1 (what openraft sends a new entry with).
    fn new_entries() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(1)),
            entries: vec![blank(2), blank(3)],
            leader_commit: Some(log_id(1)),
        }
    }

    fn commit_notice(index: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(3)),
            entries: Vec::new(),
            leader_commit: Some(log_id(index)),
        }
    }

    fn last_commit(counts: &Counts) -> Option<LogId<NodeId>> {
        *counts.last_commit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection from leader 1 (its replica as in [`leader_replica`]) to a wire peer as node 2.
    async fn leader_connection(learner: NodeId) -> (StateMachine, Arc<Counts>, PeerConnection) {
        let (replica, counts, connection, _) = leader_connection_with(learner, true, demand::LINGER).await;
        (replica, counts, connection)
    }

    /// As [`leader_connection`], with the commit attached or not and the given linger; also
    /// returns the channels, whose demand marks learners wanted.
    async fn leader_connection_with(
        learner: NodeId,
        attach_commits: bool,
        linger: Duration,
    ) -> (StateMachine, Arc<Counts>, PeerConnection, PeerChannels) {
        let replica = leader_replica(learner).await;
        let channels = PeerChannels::new(1, Duration::from_secs(5), BTreeMap::new(), None)
            .with_replica(replica.clone(), attach_commits)
            .with_learner_linger(linger);
        let (counts, connection) = connect_from(channels.clone(), Some(usize::MAX)).await;
        (replica, counts, connection, channels)
    }

    /// Longer than any test may take: only a customer's demand can end such a hold in time.
    const HOLD: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn an_idle_learners_acknowledgement_is_held_until_it_is_wanted() {
        // With a data directory (no commit attached) and in memory alike.
        for attach_commits in [false, true] {
            let (mut replica, counts, mut connection, channels) = leader_connection_with(2, attach_commits, HOLD).await;
            replica.apply([blank(2), blank(3)]).await.expect("apply");
            let mut sending = tokio::spawn(async move {
                send(&mut connection, new_entries(), LONG).await;
                connection
            });
            while counts.streamed.load(Ordering::SeqCst) == 0 {
                assert!(
                    !sending.is_finished(),
                    "the call ended before the learner got the entries"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Delivered, and the answer is held: openraft sends this learner nothing more.
            let early = tokio::time::timeout(Duration::from_millis(200), &mut sending).await;
            assert!(early.is_err(), "the answer of an idle learner was not held");
            // Another learner's demand changes nothing; this one's ends the hold.
            let _theirs = channels.demand().want(Some(3));
            let early = tokio::time::timeout(Duration::from_millis(200), &mut sending).await;
            assert!(early.is_err(), "another learner's demand ended the hold");
            let _ours = channels.demand().want(Some(2));
            let ended = tokio::time::timeout(Duration::from_secs(60), sending).await;
            assert!(ended.is_ok(), "a customer's demand did not end the hold");
            assert_eq!(counts.streamed.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn a_wanted_learners_acknowledgement_is_not_held() {
        let (mut replica, counts, mut connection, channels) = leader_connection_with(2, true, HOLD).await;
        replica.apply([blank(2), blank(3)]).await.expect("apply");
        let _waiting = channels.demand().want(Some(2));
        let sent = tokio::time::timeout(Duration::from_secs(60), send(&mut connection, new_entries(), LONG)).await;
        assert!(sent.is_ok(), "the answer of a wanted learner was held");
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 1);
        // A voter is never held, wanted or not.
        let (_replica, counts, mut connection, _channels) = leader_connection_with(3, true, HOLD).await;
        let sent = tokio::time::timeout(Duration::from_secs(60), send(&mut connection, new_entries(), LONG)).await;
        assert!(sent.is_ok(), "a voter's answer was held");
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 1);
    }

    /// Sends `request` with openraft's timeout `ttl`; the peer answers Success.
    async fn send(connection: &mut PeerConnection, request: AppendEntriesRequest<TypeConfig>, ttl: Duration) {
        let reply = connection.append_entries(request, RPCOption::new(ttl)).await;
        assert!(matches!(reply, Ok(AppendEntriesResponse::Success)), "{reply:?}");
    }

    /// Long enough that only an apply can release held entries in time.
    const LONG: Duration = Duration::from_secs(240);

    #[tokio::test]
    async fn a_learner_gets_new_entries_with_their_commit_and_no_separate_notice() {
        let (mut replica, counts, mut connection) = leader_connection(2).await;
        let mut sending = tokio::spawn(async move {
            send(&mut connection, new_entries(), LONG).await;
            connection
        });
        let early = tokio::time::timeout(Duration::from_millis(200), &mut sending).await;
        assert!(early.is_err(), "entries went out before the leader applied them");
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 0);

        replica.apply([blank(2), blank(3)]).await.expect("apply");
        let mut connection = sending.await.expect("task");
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 1);
        assert_eq!(
            last_commit(&counts),
            Some(log_id(3)),
            "the commit travels with the entries"
        );

        // openraft's commit notice for entry 3 tells the learner nothing new: answered here.
        send(&mut connection, commit_notice(3), LONG).await;
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 1);
        // A later commit is news, and goes.
        replica.apply([blank(4)]).await.expect("apply");
        send(&mut connection, commit_notice(4), LONG).await;
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 2);
        assert_eq!(last_commit(&counts), Some(log_id(4)));
    }

    #[tokio::test]
    async fn entries_the_leader_does_not_apply_in_time_go_without_a_commit() {
        let (_replica, counts, mut connection) = leader_connection(2).await;
        // Held for a quarter of the timeout (100 ms), then sent as openraft built them.
        send(&mut connection, new_entries(), Duration::from_millis(400)).await;
        assert_eq!(last_commit(&counts), Some(log_id(1)));
        send(&mut connection, commit_notice(3), LONG).await;
        assert_eq!(
            counts.streamed.load(Ordering::SeqCst),
            2,
            "the commit notice is news here"
        );
    }

    #[tokio::test]
    async fn a_voter_gets_new_entries_at_once() {
        // Node 2 is not this replica's learner (node 3 is): its acknowledgement makes the commit.
        let (_replica, counts, mut connection) = leader_connection(3).await;
        send(&mut connection, new_entries(), LONG).await;
        assert_eq!(last_commit(&counts), Some(log_id(1)));
        send(&mut connection, commit_notice(3), LONG).await;
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 2);
        assert_eq!(last_commit(&counts), Some(log_id(3)));
    }

    #[test]
    fn peers_that_are_going_away_are_backed_off_from_and_refusals_are_not() {
        let unreachable =
            |status: Status| matches!(transport_error::<RaftError<NodeId>>(status), RPCError::Unreachable(_));
        assert!(unreachable(Status::unavailable("tcp connect error")));
        assert!(unreachable(Status::deadline_exceeded("no answer")));
        assert!(unreachable(Status::cancelled("connection closed")));
        assert!(unreachable(Status::unknown("the peer's handler failed")));
        // INTERNAL is transient only when the connection failed here (a GOAWAY race,
        // transport::tests); one the peer sent is an answer.
        assert!(!unreachable(Status::internal("from the peer")));
        assert!(!unreachable(Status::invalid_argument("undecodable")));
    }
}
