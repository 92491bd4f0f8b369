//! What each subcommand does, on top of the library: `run`, `bench`, `server`, `branch`,
//! `replay`/`client` (with the artifact upload) and `health-check`.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use distbank::branch::{BranchConfig, BranchTls};
use distbank::cluster::LocalCluster;
use distbank::discovery::{self, Addresses};
use distbank::input::Input;
use distbank::output;
use distbank::replay::{self, BranchClients};
use distbank::transport::{CertDir, TlsRole};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::{BranchArgs, Command, ConsensusArgs, LocalArgs, MAX_SECONDS, ReplayArgs, UsageError};

pub(crate) async fn dispatch(command: Command) -> anyhow::Result<()> {
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
                let mut options = consensus.cluster_options(&local, IpAddr::from([127, 0, 0, 1]), None)?;
                if let Some(dir) = data_dir {
                    // A bench measures fresh branches: recovering an earlier run's state would
                    // measure something else.
                    let in_use = std::fs::read_dir(&dir).map(|mut entries| entries.next().is_some());
                    if matches!(in_use, Ok(true)) {
                        bail!(UsageError(format!("--data-dir {}: not empty", dir.display())));
                    }
                    options.data_dir = Some(dir);
                }
                let seconds = 0.0..=MAX_SECONDS as f64;
                if !(duration > 0.0 && seconds.contains(&duration)) {
                    bail!(UsageError(format!(
                        "--duration {duration}: must be a positive number of seconds, at most {MAX_SECONDS}"
                    )));
                }
                let every = sample_every.unwrap_or((duration / 10.0).clamp(1.0, 60.0));
                if !(every > 0.0 && seconds.contains(&every)) {
                    bail!(UsageError(format!(
                        "--sample-every {every}: must be a positive number of seconds, at most {MAX_SECONDS}"
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
    check_output(output_path)?;
    let branch_ids = input.branch_ids();
    let cluster = LocalCluster::start(
        &branch_ids,
        input.initial_balance(),
        &consensus.cluster_options(local, IpAddr::from([127, 0, 0, 1]), None)?,
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
    let cluster = consensus.cluster_options(local, IpAddr::from([127, 0, 0, 1]), None)?;
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
        &consensus.cluster_options(local, host, Some(base_port))?,
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
        timing: args.consensus.timing()?,
        request_timeout: Duration::from_secs(args.consensus.request_timeout),
        data_dir: args.data_dir.clone(),
        tls: BranchTls {
            peer: (args.peer_tls_dir.as_deref())
                .map(|dir| CertDir::load(dir, TlsRole::Mutual))
                .transpose()
                .map_err(|e| UsageError(format!("--peer-tls-dir: {e}")))?,
            customer: (args.customer_tls_dir.as_deref())
                .map(|dir| CertDir::load(dir, TlsRole::Server))
                .transpose()
                .map_err(|e| UsageError(format!("--customer-tls-dir: {e}")))?,
            reload_every: Duration::from_secs(args.tls_reload_secs),
        },
        standalone: true,
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
    check_output(output_path)?;
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

/// Fails before any branch starts or any event is sent when the output could not be written.
fn check_output(path: &Path) -> Result<(), UsageError> {
    output::check_writable(path).map_err(|e| UsageError(format!("output {}: cannot write there: {e}", path.display())))
}
