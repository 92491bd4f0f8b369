//! The `distbank` command line. Thin: parse flags (every flag also reads an environment
//! variable), set up logging, call the library. Exit codes: 0 ok, 1 runtime failure, 2 bad
//! input or usage.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use distbank::branch::{BranchConfig, BranchTls};
use distbank::cluster::{ClusterOptions, LocalCluster};
use distbank::discovery::{self, Addresses};
use distbank::input::{Input, InputError};
use distbank::replay::{self, BranchClients, ReplayOptions};
use distbank::replication::RaftTiming;
use distbank::telemetry::{self, LogFormat};
use distbank::{BASE_PORT, output};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "distbank",
    version,
    about = "A replicated bank: branches hold Raft-replicated replicas of one account"
)]
struct Cli {
    /// Log format (logs go to stderr).
    #[arg(long, global = true, env = "DISTBANK_LOG_FORMAT", value_enum, default_value = "auto")]
    log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317, Jaeger's
    /// OTLP port); without it nothing is exported. OTEL_SERVICE_NAME,
    /// OTEL_RESOURCE_ATTRIBUTES and OTEL_TRACES_SAMPLER[_ARG] apply as usual.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090); off by default.
    #[arg(long, global = true, env = "DISTBANK_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        #[arg(long, env = "DISTBANK_BENCH_CONCURRENT")]
        concurrent: Option<usize>,
        /// Branches for --concurrent.
        #[arg(long, env = "DISTBANK_BENCH_BRANCHES", default_value_t = 5)]
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
        #[arg(long, env = "DISTBANK_BENCH_RUNS", default_value_t = 5)]
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
        #[arg(long, env = "DISTBANK_WAIT_TIMEOUT", default_value_t = 120)]
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
        #[arg(long, env = "DISTBANK_WAIT_TIMEOUT", default_value_t = 30)]
        timeout: u64,
        #[command(flatten)]
        tls: ClientTlsArgs,
    },
}

#[derive(Args, Clone)]
struct ConsensusArgs {
    /// How many branches vote in Raft (the lowest ids); the others are non-voting replicas.
    #[arg(long, env = "DISTBANK_VOTERS", default_value_t = 3)]
    voters: usize,
    /// Seconds a customer request may wait for consensus before failing with UNAVAILABLE.
    #[arg(long, env = "DISTBANK_REQUEST_TIMEOUT", default_value_t = 10)]
    request_timeout: u64,
    /// Raft heartbeat interval in ms (also the timeout of each replication call).
    #[arg(long, env = "DISTBANK_HEARTBEAT_MS", default_value_t = RaftTiming::default().heartbeat_ms)]
    heartbeat_ms: u64,
    /// Raft election timeout T in ms: a follower that hears nothing from the leader for 2T
    /// (openraft's leader lease, during which it also refuses to vote) plus a random time in
    /// [T, 2T) starts an election, so a dead leader is replaced after 3T to 4T.
    #[arg(long, env = "DISTBANK_ELECTION_TIMEOUT_MS", default_value_t = RaftTiming::default().election_timeout_min_ms)]
    election_timeout_ms: u64,
    /// How the leader confirms it still leads before answering a linearizable read: `lease`
    /// (while a quorum of voters acknowledged it within the last 1.5T, no round; relies on
    /// clocks that do not stop while time goes on, e.g. a suspended VM) or `quorum` (a
    /// heartbeat round to the voters for every read, or every batch of concurrent reads).
    #[arg(long, env = "DISTBANK_READ_MODE", value_enum, default_value_t = ReadModeArg::Lease)]
    read_mode: ReadModeArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReadModeArg {
    Lease,
    Quorum,
}

/// How the branches of a local cluster (`run`, `server`, `bench`) are laid out in the process.
#[derive(Args, Clone)]
struct LocalArgs {
    /// Where the branches' tasks run: `single` (the whole process on one thread: the fastest
    /// for a sequential replay, whose events go one at a time through several branches),
    /// `per-core` (one single-threaded runtime per core, each branch on one of them: the
    /// most throughput for concurrent customers), `shared` (all on one work-stealing runtime),
    /// or `auto`: `single` for sequential replays (`run`, `bench` on an input), `per-core`
    /// otherwise (`server`, `bench --concurrent`, `--concurrency` above 1).
    #[arg(long, env = "DISTBANK_RUNTIMES", value_enum, default_value_t = RuntimesArg::Auto)]
    runtimes: RuntimesArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RuntimesArg {
    Auto,
    Single,
    PerCore,
    Shared,
}

impl Command {
    /// Settles `--runtimes auto` for this command; `true` when the process must run on one
    /// thread.
    fn settle_runtimes(&mut self) -> bool {
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
struct ReplayArgs {
    /// How many customer items run at once (1 = one after another, as the course specifies).
    #[arg(long, env = "DISTBANK_CONCURRENCY", default_value_t = 1)]
    concurrency: usize,
    /// Seconds one event may keep being retried (same event id) before the replay fails.
    #[arg(long, env = "DISTBANK_RETRY_BUDGET", default_value_t = 60)]
    retry_budget: u64,
}

#[derive(Args)]
struct BranchArgs {
    /// The course-format input.json (branch ids and the initial balance).
    #[arg(long, env = "DISTBANK_INPUT")]
    input: PathBuf,
    /// This branch's id. Default: the StatefulSet ordinal of POD_NAME (or the hostname) + offset.
    #[arg(long, env = "DISTBANK_BRANCH_ID")]
    id: Option<u64>,
    /// Branch id of ordinal 0.
    #[arg(long, env = "DISTBANK_ID_OFFSET", default_value_t = 1)]
    id_offset: u64,
    /// Customer API + health.
    #[arg(long, env = "DISTBANK_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Peer API (Raft).
    #[arg(long, env = "DISTBANK_PEER_LISTEN", default_value = "0.0.0.0:50052")]
    peer_listen: SocketAddr,
    /// Peer addresses as a list: 1=host:port,2=host:port,...
    #[arg(long, env = "DISTBANK_PEERS", conflicts_with = "peer_template")]
    peers: Option<String>,
    /// Peer address template with {id} or {ordinal}, e.g.
    /// distbank-{ordinal}.distbank-headless.default.svc.cluster.local:50052
    #[arg(long, env = "DISTBANK_PEER_TEMPLATE")]
    peer_template: Option<String>,
    /// Keep the consensus state (vote, log, snapshots) in this directory, synced to disk before
    /// anything is acknowledged, and recover from it on restart. Without it the branch keeps
    /// everything in memory and rejoins empty after a restart.
    #[arg(long, env = "DISTBANK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Mutual TLS between branches: a directory with tls.crt, tls.key and ca.crt (a mounted
    /// Kubernetes TLS Secret, e.g. from cert-manager). The peer API then accepts only clients
    /// with a certificate from that CA, and this branch presents its own to its peers.
    #[arg(long, env = "DISTBANK_PEER_TLS_DIR")]
    peer_tls_dir: Option<PathBuf>,
    /// TLS on the customer API: a directory with tls.crt and tls.key.
    #[arg(long, env = "DISTBANK_CUSTOMER_TLS_DIR")]
    customer_tls_dir: Option<PathBuf>,
    /// Also serve gRPC health alone, in plaintext, here (Kubernetes' gRPC probes cannot speak
    /// TLS: use it for the probes when the customer API has TLS).
    #[arg(long, env = "DISTBANK_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    #[command(flatten)]
    consensus: ConsensusArgs,
}

/// How the replay and the health check reach branches whose customer API has TLS.
#[derive(Args, Clone)]
struct ClientTlsArgs {
    /// Verify the branches' customer-API certificates with this CA (PEM) and connect over TLS.
    #[arg(long, env = "DISTBANK_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

impl ClientTlsArgs {
    fn config(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        let Some(path) = &self.tls_ca else { return Ok(None) };
        let ca = distbank::transport::read_ca(path).map_err(|e| UsageError(format!("--tls-ca: {e}")))?;
        Ok(Some(tonic::transport::ClientTlsConfig::new().ca_certificate(ca)))
    }
}

impl ConsensusArgs {
    fn cluster_options(&self, local: &LocalArgs, host: IpAddr, base_port: Option<u16>) -> ClusterOptions {
        ClusterOptions {
            host,
            base_port,
            voters: self.voters,
            timing: self.timing(),
            request_timeout: Duration::from_secs(self.request_timeout),
            data_dir: None,
            runtimes: local.runtimes.into(),
        }
    }

    fn timing(&self) -> RaftTiming {
        RaftTiming {
            heartbeat_ms: self.heartbeat_ms,
            election_timeout_min_ms: self.election_timeout_ms,
            election_timeout_max_ms: self.election_timeout_ms.saturating_mul(2),
            read_lease: matches!(self.read_mode, ReadModeArg::Lease),
        }
    }
}

impl ReplayArgs {
    fn options(&self) -> ReplayOptions {
        ReplayOptions {
            concurrency: self.concurrency,
            retry_budget: Duration::from_secs(self.retry_budget),
            ..ReplayOptions::default()
        }
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let quiet = matches!(
        cli.command,
        Command::Run { .. } | Command::Client { .. } | Command::Bench { .. }
    );
    let single = cli.command.settle_runtimes();
    let mut builder = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("distbank: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's gRPC channel needs the runtime.
    let telemetry = match runtime.block_on(async {
        telemetry::init(
            cli.log_format,
            if quiet { "warn" } else { "info" },
            cli.otlp_endpoint.as_deref(),
        )
    }) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("distbank: cannot set up telemetry: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics_stop = CancellationToken::new();
    let result = runtime.block_on(async {
        if let Some(addr) = cli.metrics_listen {
            let (bound, server) = distbank::metrics::serve(addr, metrics_stop.clone()).await?;
            tracing::info!(addr = %bound, "serving metrics at /metrics");
            tokio::spawn(server);
        }
        dispatch(cli.command).await
    });
    metrics_stop.cancel();
    // Flush the spans still buffered while the runtime (and the exporter's channel) runs: on
    // a single-threaded runtime only `block_on` drives the channel's connection.
    runtime.block_on(async {
        if let Err(e) = tokio::task::spawn_blocking(move || telemetry.shutdown()).await {
            eprintln!("distbank: flushing traces: {e}");
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("distbank: error: {e:#}");
            if e.downcast_ref::<InputError>().is_some() || e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
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
    Ok((branches, events))
}

/// A configuration mistake the user must fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            input,
            output,
            consensus,
            local,
            replay,
        } => run(&input, &output, &consensus, &local, &replay).await,
        Command::Server {
            input,
            host,
            base_port,
            consensus,
            local,
        } => server(&input, host, base_port, &consensus, &local).await,
        Command::Client {
            input,
            host,
            base_port,
            output,
            replay,
        } => {
            let input_data = distbank::input::load(&input)?;
            let list = input_data
                .branch_ids()
                .into_iter()
                .map(|id| {
                    let port = u16::try_from(u64::from(base_port) + id)
                        .map_err(|_| UsageError(format!("branch {id}: port {base_port} + {id} is beyond 65535")))?;
                    Ok((id, format!("http://{host}:{port}")))
                })
                .collect::<Result<_, UsageError>>()?;
            replay_to_file(&input_data, &Addresses::Static(list), &output, &replay, None, None).await
        }
        Command::Branch(args) => branch(args).await,
        Command::Bench {
            input,
            generate,
            save_input,
            concurrent,
            branches,
            duration,
            sample_every,
            runs,
            expect,
            data_dir,
            consensus,
            local,
            replay,
        } => {
            if let Some(clients) = concurrent {
                let mut options = consensus.cluster_options(&local, IpAddr::from([127, 0, 0, 1]), None);
                if let Some(dir) = data_dir {
                    // A bench measures fresh branches: recovering an earlier run's state would
                    // measure something else.
                    let in_use = std::fs::read_dir(&dir).map(|mut entries| entries.next().is_some());
                    if matches!(in_use, Ok(true)) {
                        bail!(UsageError(format!("--data-dir {}: not empty", dir.display())));
                    }
                    options.data_dir = Some(dir);
                }
                if !(duration.is_finite() && duration > 0.0) {
                    bail!(UsageError(format!(
                        "--duration {duration}: must be a positive number of seconds"
                    )));
                }
                let every = sample_every.unwrap_or((duration / 10.0).clamp(1.0, 60.0));
                if !(every.is_finite() && every > 0.0) {
                    bail!(UsageError(format!(
                        "--sample-every {every}: must be a positive number of seconds"
                    )));
                }
                let cpu_before = distbank::bench::cpu_time();
                let figures = distbank::bench::run_concurrent(
                    clients,
                    branches,
                    Duration::from_secs_f64(duration),
                    Duration::from_secs_f64(every),
                    &options,
                )
                .await?;
                let cpu = distbank::bench::cpu_time()
                    .zip(cpu_before)
                    .map(|(a, b)| a.saturating_sub(b));
                print!("{}", distbank::bench::concurrent_report(&figures, cpu));
                return Ok(());
            }
            let (name, input) = match (input, generate) {
                (Some(path), _) => (
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    distbank::input::load(&path)?,
                ),
                (None, Some((branches, events))) => (
                    format!("generated {branches}x{events}"),
                    distbank::bench::generated_input(branches, events, 42),
                ),
                (None, None) => bail!(UsageError("give an INPUT, --generate or --concurrent".into())),
            };
            if let Some(path) = &save_input {
                distbank::output::write_atomic(path, &distbank::bench::input_json(&input))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            bench(&name, &input, runs, expect.as_deref(), &consensus, &local, &replay).await
        }
        Command::Replay {
            input,
            branch_addr,
            id_offset,
            output,
            wait_timeout,
            upload_configmap,
            replay,
            tls,
        } => {
            let addresses = branch_addresses(&branch_addr, id_offset)?;
            let input_data = distbank::input::load(&input)?;
            let wait = Some(Duration::from_secs(wait_timeout));
            let tls = tls.config()?;
            replay_to_file(&input_data, &addresses, &output, &replay, wait, tls.as_ref()).await?;
            if let Some(name) = upload_configmap {
                upload(&output, &name).await?;
            }
            Ok(())
        }
        Command::FetchOutput {
            configmap,
            namespace,
            output,
        } => {
            let (client, default_namespace) = distbank::artifact::client_from_env().await?;
            let namespace = namespace.unwrap_or(default_namespace);
            let text = distbank::artifact::fetch(client, &namespace, &configmap).await?;
            output::write_atomic(&output, &text).with_context(|| format!("writing {}", output.display()))?;
            println!(
                "distbank: wrote {} ({} bytes) from ConfigMap {namespace}/{configmap}",
                output.display(),
                text.len()
            );
            Ok(())
        }
        Command::HealthCheck {
            addr_template,
            count,
            id_offset,
            timeout,
            tls,
        } => {
            let addresses = branch_addresses(&addr_template, id_offset)?;
            let ids: Vec<u64> = match (&addresses, count) {
                (_, Some(count)) => (1..=count).collect(),
                (Addresses::Static(map), None) => map.keys().copied().collect(),
                (Addresses::Template { .. }, None) => {
                    bail!(UsageError("--count is required with an address template".into()))
                }
            };
            let clients = BranchClients::with_tls(&addresses, &ids, Duration::from_secs(2), tls.config()?.as_ref())
                .map_err(|e| UsageError(e.to_string()))?;
            replay::wait_until_serving(&clients, Duration::from_secs(timeout)).await?;
            println!("distbank health-check: all {} branches SERVING", ids.len());
            Ok(())
        }
    }
}

/// `distbank run`: the whole system in one process.
async fn run(
    input_path: &Path,
    output_path: &Path,
    consensus: &ConsensusArgs,
    local: &LocalArgs,
    replay_args: &ReplayArgs,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let input = distbank::input::load(input_path)?;
    let branch_ids = input.branch_ids();
    let cluster = LocalCluster::start(
        &branch_ids,
        input.initial_balance(),
        &consensus.cluster_options(local, IpAddr::from([127, 0, 0, 1]), None),
    )
    .await
    .context("starting the branches")?;
    let result = async {
        cluster.wait_ready(Duration::from_secs(60)).await?;
        let ready = started.elapsed();
        let addresses = cluster.customer_addresses();
        let clients = BranchClients::new(&addresses, &branch_ids, Duration::from_secs(2))?;
        // The same health check the probes use; it also opens every connection in parallel.
        replay::wait_until_serving(&clients, Duration::from_secs(10)).await?;
        let options = replay_args.options();
        let outputs = tokio::select! {
            outputs = replay::replay(&input, &clients, &options) => outputs?,
            _ = shutdown_signal() => bail!("interrupted; no output written"),
        };
        // Every replica shows the final balance before the branches stop (followers learn of
        // the last commit one round after the customer's branch answered).
        if !cluster.wait_converged(Duration::from_secs(10)).await {
            tracing::warn!("not every replica applied the last write before shutdown");
        }
        let replayed = started.elapsed() - ready;
        output::write_atomic(output_path, &output::render(&outputs))
            .with_context(|| format!("writing {}", output_path.display()))?;
        Ok::<_, anyhow::Error>((ready, replayed))
    }
    .await;
    let stopping = Instant::now();
    cluster.shutdown().await.context("stopping the branches")?;
    let (ready, replayed) = result?;
    println!(
        "distbank run: {} branches, {} customer items, {} events; start {:.0} ms, replay {:.0} ms, stop {:.0} ms, total {:.0} ms; wrote {}",
        branch_ids.len(),
        input.customers.len(),
        input.event_count(),
        ready.as_secs_f64() * 1e3,
        replayed.as_secs_f64() * 1e3,
        stopping.elapsed().as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3,
        output_path.display()
    );
    Ok(())
}

/// `distbank bench`: repeated complete local runs, with figures.
async fn bench(
    name: &str,
    input: &Input,
    runs: usize,
    expect: Option<&Path>,
    consensus: &ConsensusArgs,
    local: &LocalArgs,
    replay_args: &ReplayArgs,
) -> anyhow::Result<()> {
    let expected = expect
        .map(|path| std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display())))
        .transpose()?;
    let cluster = consensus.cluster_options(local, IpAddr::from([127, 0, 0, 1]), None);
    let options = replay_args.options();
    let cpu_before = distbank::bench::cpu_time();
    let mut figures = Vec::with_capacity(runs);
    for run in 1..=runs.max(1) {
        let figure = distbank::bench::run_once(input, &cluster, &options).await?;
        if let Some(expected) = &expected
            && figure.output.trim() != expected.trim()
        {
            bail!("run {run}: the output differs from the expected output");
        }
        figures.push(figure);
    }
    let cpu = distbank::bench::cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    print!(
        "{}",
        distbank::bench::report(name, input.branch_ids().len(), input.event_count(), &figures, cpu)
    );
    if expected.is_some() {
        println!("  output: identical to the expected output in every run");
    }
    Ok(())
}

/// `distbank server`: every branch of INPUT on the original port scheme, until a signal.
async fn server(
    input_path: &Path,
    host: IpAddr,
    base_port: u16,
    consensus: &ConsensusArgs,
    local: &LocalArgs,
) -> anyhow::Result<()> {
    let input = distbank::input::load(input_path)?;
    let cluster = LocalCluster::start(
        &input.branch_ids(),
        input.initial_balance(),
        &consensus.cluster_options(local, host, Some(base_port)),
    )
    .await
    .context("starting the branches")?;
    let ready = tokio::select! {
        ready = cluster.wait_ready(Duration::from_secs(60)) => ready,
        _ = shutdown_signal() => Ok(()),
    };
    if ready.is_ok() {
        for (id, addr) in cluster.customer_addrs() {
            tracing::info!(branch = id, %addr, "branch serving");
        }
        println!(
            "distbank server: {} branches serving on {host}:{}+N; Ctrl-C to stop",
            input.branch_ids().len(),
            base_port
        );
        shutdown_signal().await;
    }
    cluster.shutdown().await.context("stopping the branches")?;
    ready?;
    Ok(())
}

/// `distbank branch`: one member, until a signal.
async fn branch(args: BranchArgs) -> anyhow::Result<()> {
    let input = distbank::input::load(&args.input)?;
    let id = match args.id {
        Some(id) => id,
        None => {
            let ordinal = pod_ordinal()?;
            ordinal
                .checked_add(args.id_offset)
                .ok_or_else(|| UsageError(format!("ordinal {ordinal} + offset {} overflows", args.id_offset)))?
        }
    };
    let branch_ids = input.branch_ids();
    if !branch_ids.contains(&id) {
        bail!(UsageError(format!(
            "branch id {id} is not in {} (branch ids {}..={}); check the StatefulSet's replicas and --id-offset",
            args.input.display(),
            branch_ids.first().copied().unwrap_or_default(),
            branch_ids.last().copied().unwrap_or_default()
        )));
    }
    let addresses = match (&args.peers, &args.peer_template) {
        (Some(list), _) => Addresses::parse_list(list),
        (None, Some(template)) => Addresses::template(template, args.id_offset),
        (None, None) => bail!(UsageError("one of --peers or --peer-template is required".into())),
    }
    .map_err(|e| UsageError(e.to_string()))?;
    let members = addresses
        .resolve_all(&branch_ids)
        .map_err(|e| UsageError(e.to_string()))?;
    let customer = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let peer = TcpListener::bind(args.peer_listen)
        .await
        .with_context(|| format!("listening on {}", args.peer_listen))?;
    let config = BranchConfig {
        id,
        initial_balance: input.initial_balance(),
        members,
        voters: args.consensus.voters,
        timing: args.consensus.timing(),
        request_timeout: Duration::from_secs(args.consensus.request_timeout),
        data_dir: args.data_dir.clone(),
        tls: BranchTls {
            peer: (args.peer_tls_dir.as_deref())
                .map(distbank::transport::PeerTls::load_dir)
                .transpose()
                .map_err(|e| UsageError(format!("--peer-tls-dir: {e}")))?,
            customer: (args.customer_tls_dir.as_deref())
                .map(distbank::transport::customer_server_tls)
                .transpose()
                .map_err(|e| UsageError(format!("--customer-tls-dir: {e}")))?,
        },
    };
    // The bound addresses (not the flags): with port 0 this is how a caller finds the ports.
    let listen = customer
        .local_addr()
        .map_or_else(|_| args.listen.to_string(), |a| a.to_string());
    let peer_listen = peer
        .local_addr()
        .map_or_else(|_| args.peer_listen.to_string(), |a| a.to_string());
    let health = match args.health_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?,
        ),
        None => None,
    };
    tracing::info!(
        branch = id,
        listen = %listen,
        peer_listen = %peer_listen,
        health_listen = ?args.health_listen,
        data_dir = ?args.data_dir,
        peer_tls = config.tls.peer.is_some(),
        customer_tls = config.tls.customer.is_some(),
        "starting branch"
    );
    let shutdown = CancellationToken::new();
    let running = distbank::branch::start_with_health(config, customer, peer, health, shutdown.clone()).await?;
    let join = running.join();
    tokio::pin!(join);
    // The branch ends on a signal, or by itself when its Raft core died (then exit code 1, so
    // Kubernetes restarts the pod and it recovers from its data directory).
    let result = tokio::select! {
        result = &mut join => result,
        _ = shutdown_signal() => {
            shutdown.cancel();
            join.await
        }
    };
    result?;
    tracing::info!(branch = id, "stopped");
    Ok(())
}

/// `--branch-addr`: a template with {id}/{ordinal}, or a list.
fn branch_addresses(spec: &str, id_offset: u64) -> Result<Addresses, UsageError> {
    if spec.contains('{') {
        Addresses::template(spec, id_offset)
    } else {
        Addresses::parse_list(spec)
    }
    .map_err(|e| UsageError(format!("--branch-addr: {e}")))
}

/// Uploads the written output file to ConfigMap `name` (the replay Job's artifact).
async fn upload(output_path: &Path, name: &str) -> anyhow::Result<()> {
    let output = std::fs::read_to_string(output_path).with_context(|| format!("reading {}", output_path.display()))?;
    let (client, namespace) = distbank::artifact::client_from_env().await?;
    let labels = [
        ("app.kubernetes.io/name", "distbank"),
        ("app.kubernetes.io/component", "output"),
        ("app.kubernetes.io/managed-by", distbank::artifact::FIELD_MANAGER),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let payload = distbank::artifact::upload(client, &namespace, name, &output, labels).await?;
    let how = match payload {
        distbank::artifact::Payload::Plain(_) => format!("data[{:?}]", distbank::artifact::PLAIN_KEY),
        distbank::artifact::Payload::Gzip(bytes) => {
            format!(
                "binaryData[{:?}] ({} bytes gzip)",
                distbank::artifact::GZIP_KEY,
                bytes.len()
            )
        }
    };
    println!("distbank: uploaded output.json to ConfigMap {namespace}/{name} {how}");
    Ok(())
}

/// Replays against running branches and writes the output (nothing is written on failure).
async fn replay_to_file(
    input: &Input,
    addresses: &Addresses,
    output_path: &Path,
    replay_args: &ReplayArgs,
    wait: Option<Duration>,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let customer_branches: Vec<u64> = {
        let mut ids: Vec<u64> = input.customers.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let clients = BranchClients::with_tls(addresses, &customer_branches, Duration::from_secs(2), tls)
        .map_err(|e| UsageError(e.to_string()))?;
    if let Some(timeout) = wait {
        replay::wait_until_serving(&clients, timeout).await?;
    }
    // Marks the start of the events in the Job's log (the end-to-end test faults a branch after it).
    tracing::info!(
        customers = input.customers.len(),
        events = input.event_count(),
        "replay started"
    );
    let options = replay_args.options();
    let outputs = tokio::select! {
        outputs = replay::replay(input, &clients, &options) => outputs?,
        _ = shutdown_signal() => bail!("interrupted; no output written"),
    };
    output::write_atomic(output_path, &output::render(&outputs))
        .with_context(|| format!("writing {}", output_path.display()))?;
    println!(
        "distbank: replayed {} customer items ({} events) in {:.0} ms; wrote {}",
        input.customers.len(),
        input.event_count(),
        started.elapsed().as_secs_f64() * 1e3,
        output_path.display()
    );
    Ok(())
}

/// This pod's StatefulSet ordinal: `POD_INDEX` (the `apps.kubernetes.io/pod-index` label via the
/// downward API, Kubernetes 1.28+; empty where the label does not exist), else the number at
/// the end of `POD_NAME` or the hostname.
fn pod_ordinal() -> Result<u64, UsageError> {
    if let Some(index) = std::env::var("POD_INDEX").ok().filter(|v| !v.trim().is_empty()) {
        return index.trim().parse().map_err(|_| {
            UsageError(format!(
                "POD_INDEX={index:?}: expected the pod's ordinal, a non-negative integer"
            ))
        });
    }
    let name =
        pod_name().ok_or_else(|| UsageError("no --id, and neither POD_NAME nor the hostname is available".into()))?;
    discovery::ordinal_from_pod_name(&name).map_err(|e| UsageError(e.to_string()))
}

/// POD_NAME (Kubernetes downward API), else the hostname.
fn pod_name() -> Option<String> {
    std::env::var("POD_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|name| !name.is_empty())
}

/// Resolves on SIGINT or SIGTERM (Kubernetes stops pods with SIGTERM).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops this process");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
