//! The command line: every subcommand and flag (each flag also read from an environment
//! variable), and how flags turn into the library's options.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use distbank::BASE_PORT;
use distbank::cluster::ClusterOptions;
use distbank::replay::ReplayOptions;
use distbank::replication::{DEFAULT_SNAPSHOT_EVERY, RaftTiming};
use distbank::telemetry::LogFormat;

/// The longest any timeout, budget or interval flag may be: a week. Past that a value is a
/// typo, and deadlines computed from it would overflow the clock.
pub(crate) const MAX_SECONDS: u64 = 7 * 24 * 3600;
const MAX_MILLIS: u64 = MAX_SECONDS * 1000;

/// The most branches a generated benchmark starts on this machine (two listening ports each).
const MAX_LOCAL_BRANCHES: u64 = 10_000;

/// A count that must be at least 1 (clients, runs, voters).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

#[derive(Parser)]
#[command(
    name = "distbank",
    version,
    about = "A replicated bank: branches hold Raft-replicated replicas of one account"
)]
pub(crate) struct Cli {
    /// Log format (logs go to stderr).
    #[arg(long, global = true, env = "DISTBANK_LOG_FORMAT", value_enum, default_value = "auto")]
    pub(crate) log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317, Jaeger's
    /// OTLP port); without it nothing is exported. OTEL_SERVICE_NAME,
    /// OTEL_RESOURCE_ATTRIBUTES and OTEL_TRACES_SAMPLER[_ARG] apply as usual.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub(crate) otlp_endpoint: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090); off by default.
    #[arg(long, global = true, env = "DISTBANK_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run everything on this machine: start every branch of INPUT in-process on loopback,
    /// replay all customers, write output.json, stop.
    Run {
        /// The course-format input.json.
        input: PathBuf,
        /// Where to write the output.
        #[arg(short, long, env = "DISTBANK_OUTPUT", default_value = "output.json")]
        output: PathBuf,
        #[command(flatten)]
        consensus: ConsensusArgs,
        #[command(flatten)]
        local: LocalArgs,
        #[command(flatten)]
        replay: ReplayArgs,
    },
    /// Start every branch of INPUT on HOST:(BASE_PORT+N), like the original `server.py`;
    /// runs until SIGINT/SIGTERM.
    Server {
        input: PathBuf,
        #[arg(long, env = "DISTBANK_HOST", default_value = "127.0.0.1")]
        host: IpAddr,
        #[arg(long, env = "DISTBANK_BASE_PORT", default_value_t = BASE_PORT)]
        base_port: u16,
        #[command(flatten)]
        consensus: ConsensusArgs,
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Replay INPUT against branches at HOST:(BASE_PORT+N), like the original `client.py`;
    /// writes output.json in the working directory.
    Client {
        input: PathBuf,
        #[arg(long, env = "DISTBANK_HOST", default_value = "localhost")]
        host: String,
        #[arg(long, env = "DISTBANK_BASE_PORT", default_value_t = BASE_PORT)]
        base_port: u16,
        #[arg(short, long, env = "DISTBANK_OUTPUT", default_value = "output.json")]
        output: PathBuf,
        #[command(flatten)]
        replay: ReplayArgs,
    },
    /// Time complete local runs of INPUT (start-up, replay, output, shutdown) and print
    /// wall time, events/s, latency percentiles by operation, peak RSS and CPU time.
    #[command(group(clap::ArgGroup::new("workload").required(true).args(["input", "generate", "concurrent"])))]
    Bench {
        /// A course-format input file to replay.
        input: Option<PathBuf>,
        /// Instead of a file: a generated sequential workload BRANCHESxEVENTS (e.g. 20x1000;
        /// deposits, withdrawals of which many fail, queries; fixed seed).
        #[arg(long, env = "DISTBANK_BENCH_GENERATE", value_parser = parse_generate)]
        generate: Option<(u64, u64)>,
        /// Instead of a file: CLIENTS concurrent customers for --duration seconds against
        /// --branches branches (throughput).
        #[arg(long, env = "DISTBANK_BENCH_CONCURRENT", value_parser = at_least_one())]
        concurrent: Option<usize>,
        /// Branches for --concurrent.
        #[arg(long, env = "DISTBANK_BENCH_BRANCHES", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=MAX_LOCAL_BRANCHES))]
        branches: u64,
        /// Seconds for --concurrent (a soak: e.g. 600).
        #[arg(long, env = "DISTBANK_BENCH_DURATION", default_value_t = 30.0)]
        duration: f64,
        /// With --concurrent: record RSS and throughput every this many seconds (printed live to
        /// stderr and in the report). Default: a tenth of --duration, between 1 and 60 s.
        #[arg(long, env = "DISTBANK_BENCH_SAMPLE_EVERY")]
        sample_every: Option<f64>,
        /// Also write the generated input (course format) here, e.g. to run the original on it.
        #[arg(long, env = "DISTBANK_BENCH_SAVE_INPUT", requires = "generate")]
        save_input: Option<PathBuf>,
        /// How many runs (each on a fresh cluster).
        #[arg(long, env = "DISTBANK_BENCH_RUNS", default_value_t = 5, value_parser = at_least_one())]
        runs: usize,
        /// Check every run's output against this file (e.g. the course's reference output).
        #[arg(long, env = "DISTBANK_BENCH_EXPECT")]
        expect: Option<PathBuf>,
        /// With --concurrent: durable branches, each with a data directory DIR/branch-N (fsync
        /// before every acknowledgement, as `distbank branch --data-dir`). DIR must not exist
        /// or be empty.
        #[arg(long, env = "DISTBANK_BENCH_DATA_DIR", requires = "concurrent")]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        consensus: ConsensusArgs,
        #[command(flatten)]
        local: LocalArgs,
        #[command(flatten)]
        replay: ReplayArgs,
    },
    /// Run one branch (one Kubernetes pod).
    Branch(BranchArgs),
    /// Replay INPUT against running branches whose addresses come from a template or list.
    Replay {
        input: PathBuf,
        /// Customer-API address of branch N: a template with {id} or {ordinal}
        /// (e.g. http://distbank-{ordinal}.distbank-headless:50051) or a list 1=host:port,2=...
        #[arg(long, env = "DISTBANK_BRANCH_ADDR")]
        branch_addr: String,
        /// {ordinal} = branch id - offset.
        #[arg(long, env = "DISTBANK_ID_OFFSET", default_value_t = 1)]
        id_offset: u64,
        #[arg(short, long, env = "DISTBANK_OUTPUT", default_value = "output.json")]
        output: PathBuf,
        /// Seconds to wait for every branch to report SERVING before replaying.
        #[arg(long, env = "DISTBANK_WAIT_TIMEOUT", default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
        wait_timeout: u64,
        /// Also upload output.json to this ConfigMap (in-cluster credentials; namespace from
        /// POD_NAMESPACE or the service account).
        #[arg(long, env = "DISTBANK_UPLOAD_CONFIGMAP")]
        upload_configmap: Option<String>,
        #[command(flatten)]
        replay: ReplayArgs,
        #[command(flatten)]
        tls: ClientTlsArgs,
    },
    /// Fetch output.json from the ConfigMap the replay Job uploaded it to (kubeconfig or
    /// in-cluster credentials); handles both the plain and the gzip form.
    FetchOutput {
        /// The ConfigMap: `<release>-output`.
        #[arg(long, env = "DISTBANK_UPLOAD_CONFIGMAP", default_value = "distbank-output")]
        configmap: String,
        /// Namespace (default: the kubeconfig's / service account's).
        #[arg(short, long, env = "POD_NAMESPACE")]
        namespace: Option<String>,
        #[arg(short, long, env = "DISTBANK_OUTPUT", default_value = "output.json")]
        output: PathBuf,
    },
    /// Check that branches report SERVING over gRPC health (what `helm test` runs); exit 0 if
    /// all do within the timeout.
    HealthCheck {
        /// Customer-API address template with {id} or {ordinal}, or a list 1=host:port,...
        #[arg(long, env = "DISTBANK_BRANCH_ADDR")]
        addr_template: String,
        /// Branch ids 1..=COUNT (with a list: every listed branch).
        #[arg(long, env = "DISTBANK_BRANCH_COUNT")]
        count: Option<u64>,
        #[arg(long, env = "DISTBANK_ID_OFFSET", default_value_t = 1)]
        id_offset: u64,
        /// Seconds to wait for SERVING.
        #[arg(long, env = "DISTBANK_WAIT_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
        timeout: u64,
        #[command(flatten)]
        tls: ClientTlsArgs,
    },
}

#[derive(Args, Clone)]
pub(crate) struct ConsensusArgs {
    /// How many branches vote in Raft (the lowest ids); the others are non-voting replicas.
    #[arg(long, env = "DISTBANK_VOTERS", default_value_t = 3, value_parser = at_least_one())]
    pub(crate) voters: usize,
    /// Seconds a customer request may wait for consensus before failing with UNAVAILABLE.
    #[arg(long, env = "DISTBANK_REQUEST_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub(crate) request_timeout: u64,
    /// Raft heartbeat interval in ms (also the timeout of each replication call).
    #[arg(long, env = "DISTBANK_HEARTBEAT_MS", default_value_t = RaftTiming::default().heartbeat_ms, value_parser = clap::value_parser!(u64).range(1..=MAX_MILLIS))]
    pub(crate) heartbeat_ms: u64,
    /// Raft election timeout T in ms: a follower that hears nothing from the leader for 2T
    /// (openraft's leader lease, during which it also refuses to vote) plus a random time in
    /// [T, 2T) asks the other voters whether they would vote for it (pre-vote) and, with a
    /// majority, starts an election, so a dead leader is replaced after 3T to 4T.
    #[arg(long, env = "DISTBANK_ELECTION_TIMEOUT_MS", default_value_t = RaftTiming::default().election_timeout_min_ms, value_parser = clap::value_parser!(u64).range(1..=MAX_MILLIS))]
    pub(crate) election_timeout_ms: u64,
    /// How the leader confirms it still leads before answering a linearizable read: `lease`
    /// (while a quorum of voters acknowledged it within the last 1.5T, no round; relies on
    /// clocks that do not stop while time goes on, e.g. a suspended VM) or `quorum` (a
    /// heartbeat round to the voters for every read, or every batch of concurrent reads).
    #[arg(long, env = "DISTBANK_READ_MODE", value_enum, default_value_t = ReadModeArg::Lease)]
    pub(crate) read_mode: ReadModeArg,
    /// Log entries applied between two snapshots of a branch's state; after each snapshot the
    /// log keeps only the last tenth of them (like etcd's --snapshot-count). Fewer: less log in
    /// memory and on disk, more snapshot work.
    #[arg(long, env = "DISTBANK_SNAPSHOT_EVERY", default_value_t = DEFAULT_SNAPSHOT_EVERY, value_parser = clap::value_parser!(u64).range(1..=MAX_SNAPSHOT_EVERY))]
    pub(crate) snapshot_every: u64,
}

/// Most entries between snapshots: the log held in memory between them must stay bounded.
const MAX_SNAPSHOT_EVERY: u64 = 10_000_000;

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum ReadModeArg {
    Lease,
    Quorum,
}

/// How the branches of a local cluster (`run`, `server`, `bench`) are laid out in the process.
#[derive(Args, Clone)]
pub(crate) struct LocalArgs {
    /// Where the branches' tasks run: `single` (the whole process on one thread: the fastest
    /// for a sequential replay, whose events go one at a time through several branches),
    /// `per-core` (one single-threaded runtime per core, each branch on one of them: the
    /// most throughput for concurrent customers), `shared` (all on one work-stealing runtime),
    /// or `auto`: `single` for sequential replays (`run`, `bench` on an input), `per-core`
    /// otherwise (`server`, `bench --concurrent`, `--concurrency` above 1).
    #[arg(long, env = "DISTBANK_RUNTIMES", value_enum, default_value_t = RuntimesArg::Auto)]
    pub(crate) runtimes: RuntimesArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RuntimesArg {
    Auto,
    Single,
    PerCore,
    Shared,
}

impl Command {
    /// Settles `--runtimes auto` for this command; `true` when the process must run on one
    /// thread.
    pub(crate) fn settle_runtimes(&mut self) -> bool {
        let (local, sequential) = match self {
            Command::Run { local, replay, .. } => (local, replay.concurrency <= 1),
            Command::Bench {
                local,
                replay,
                concurrent,
                ..
            } => (local, concurrent.is_none() && replay.concurrency <= 1),
            Command::Server { local, .. } => (local, false),
            _ => return false,
        };
        if local.runtimes == RuntimesArg::Auto {
            local.runtimes = if sequential {
                RuntimesArg::Single
            } else {
                RuntimesArg::PerCore
            };
        }
        local.runtimes == RuntimesArg::Single
    }
}

impl From<RuntimesArg> for distbank::cluster::Runtimes {
    fn from(arg: RuntimesArg) -> Self {
        match arg {
            RuntimesArg::PerCore => distbank::cluster::Runtimes::PerCore,
            // The process's runtime is then the one thread (see `main`).
            RuntimesArg::Shared | RuntimesArg::Single => distbank::cluster::Runtimes::Shared,
            // Settled before any cluster starts (`Command::settle_runtimes`).
            RuntimesArg::Auto => distbank::cluster::Runtimes::PerCore,
        }
    }
}

#[derive(Args, Clone)]
pub(crate) struct ReplayArgs {
    /// How many customer items run at once (1 = one after another, as the course specifies).
    #[arg(long, env = "DISTBANK_CONCURRENCY", default_value_t = 1, value_parser = at_least_one())]
    pub(crate) concurrency: usize,
    /// Seconds one event may keep being retried (same event id) before the replay fails.
    #[arg(long, env = "DISTBANK_RETRY_BUDGET", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    pub(crate) retry_budget: u64,
}

#[derive(Args)]
pub(crate) struct BranchArgs {
    /// The course-format input.json (branch ids and the initial balance).
    #[arg(long, env = "DISTBANK_INPUT")]
    pub(crate) input: PathBuf,
    /// This branch's id. Default: the StatefulSet ordinal of POD_NAME (or the hostname) + offset.
    #[arg(long, env = "DISTBANK_BRANCH_ID")]
    pub(crate) id: Option<u64>,
    /// Branch id of ordinal 0.
    #[arg(long, env = "DISTBANK_ID_OFFSET", default_value_t = 1)]
    pub(crate) id_offset: u64,
    /// Customer API + health.
    #[arg(long, env = "DISTBANK_LISTEN", default_value = "0.0.0.0:50051")]
    pub(crate) listen: SocketAddr,
    /// Peer API (Raft).
    #[arg(long, env = "DISTBANK_PEER_LISTEN", default_value = "0.0.0.0:50052")]
    pub(crate) peer_listen: SocketAddr,
    /// Peer addresses as a list: 1=host:port,2=host:port,...
    #[arg(long, env = "DISTBANK_PEERS", conflicts_with = "peer_template")]
    pub(crate) peers: Option<String>,
    /// Peer address template with {id} or {ordinal}, e.g.
    /// distbank-{ordinal}.distbank-headless.default.svc.cluster.local:50052
    #[arg(long, env = "DISTBANK_PEER_TEMPLATE")]
    pub(crate) peer_template: Option<String>,
    /// Keep the consensus state (vote, log, snapshots) in this directory, synced to disk before
    /// anything is acknowledged, and recover from it on restart. Without it the branch keeps
    /// everything in memory and rejoins empty after a restart.
    #[arg(long, env = "DISTBANK_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Mutual TLS between branches: a directory with tls.crt, tls.key and ca.crt (a mounted
    /// Kubernetes TLS Secret, e.g. from cert-manager). The peer API then accepts only clients
    /// with a certificate from that CA, and this branch presents its own to its peers.
    #[arg(long, env = "DISTBANK_PEER_TLS_DIR")]
    pub(crate) peer_tls_dir: Option<PathBuf>,
    /// TLS on the customer API: a directory with tls.crt and tls.key.
    #[arg(long, env = "DISTBANK_CUSTOMER_TLS_DIR")]
    pub(crate) customer_tls_dir: Option<PathBuf>,
    /// Re-read both TLS directories this often (seconds); renewed certificates (cert-manager
    /// rewrites the Secret before expiry) are then used for every new connection, without a
    /// restart. Files that do not parse are reported and the certificates in use stay. 0: never.
    #[arg(long, env = "DISTBANK_TLS_RELOAD_SECS", default_value_t = distbank::transport::RELOAD_INTERVAL.as_secs(), value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    pub(crate) tls_reload_secs: u64,
    /// Also serve gRPC health alone, in plaintext, here (Kubernetes' gRPC probes cannot speak
    /// TLS: use it for the probes when the customer API has TLS).
    #[arg(long, env = "DISTBANK_HEALTH_LISTEN")]
    pub(crate) health_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub(crate) consensus: ConsensusArgs,
}

/// How the replay and the health check reach branches whose customer API has TLS.
#[derive(Args, Clone)]
pub(crate) struct ClientTlsArgs {
    /// Verify the branches' customer-API certificates with this CA (PEM) and connect over TLS.
    #[arg(long, env = "DISTBANK_TLS_CA")]
    pub(crate) tls_ca: Option<PathBuf>,
}

impl ClientTlsArgs {
    pub(crate) fn config(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        let Some(path) = &self.tls_ca else { return Ok(None) };
        let ca = distbank::transport::read_ca(path).map_err(|e| UsageError(format!("--tls-ca: {e}")))?;
        Ok(Some(tonic::transport::ClientTlsConfig::new().ca_certificate(ca)))
    }
}

impl ConsensusArgs {
    pub(crate) fn cluster_options(
        &self,
        local: &LocalArgs,
        host: IpAddr,
        base_port: Option<u16>,
    ) -> Result<ClusterOptions, UsageError> {
        Ok(ClusterOptions {
            host,
            base_port,
            voters: self.voters,
            timing: self.timing()?,
            request_timeout: Duration::from_secs(self.request_timeout),
            data_dir: None,
            runtimes: local.runtimes.into(),
        })
    }

    pub(crate) fn timing(&self) -> Result<RaftTiming, UsageError> {
        // openraft's rule, said in the flags' terms (its own message names its fields).
        if self.election_timeout_ms <= self.heartbeat_ms {
            return Err(UsageError(format!(
                "--election-timeout-ms {} must be greater than --heartbeat-ms {}: a follower must \
                 hear several heartbeats within one election timeout",
                self.election_timeout_ms, self.heartbeat_ms
            )));
        }
        Ok(RaftTiming {
            heartbeat_ms: self.heartbeat_ms,
            election_timeout_min_ms: self.election_timeout_ms,
            election_timeout_max_ms: self.election_timeout_ms.saturating_mul(2),
            read_lease: matches!(self.read_mode, ReadModeArg::Lease),
            snapshot_every: self.snapshot_every,
        })
    }
}

impl ReplayArgs {
    pub(crate) fn options(&self) -> ReplayOptions {
        ReplayOptions {
            concurrency: self.concurrency,
            retry_budget: Duration::from_secs(self.retry_budget),
            ..ReplayOptions::default()
        }
    }
}

/// `--generate 20x1000` → (20, 1000).
fn parse_generate(text: &str) -> Result<(u64, u64), String> {
    let (branches, events) = text
        .split_once(['x', 'X'])
        .ok_or("expected BRANCHESxEVENTS, e.g. 20x1000")?;
    let branches: u64 = branches
        .trim()
        .parse()
        .map_err(|_| format!("bad branch count {branches:?}"))?;
    let events: u64 = events
        .trim()
        .parse()
        .map_err(|_| format!("bad event count {events:?}"))?;
    if branches == 0 || events == 0 {
        return Err("branches and events must be at least 1".into());
    }
    // One machine's worth: two listening ports per branch, the workload held in memory.
    if branches > MAX_LOCAL_BRANCHES || events > 10_000_000 {
        return Err(format!("at most {MAX_LOCAL_BRANCHES} branches and 10000000 events"));
    }
    Ok((branches, events))
}

/// A configuration mistake the user must fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);
