//! `distbank bench`: repeatable figures for the whole local run (start-up, replay, output,
//! shutdown) of one input: wall time, events/s, per-operation latency percentiles, peak RSS
//! and CPU time of the process (which hosts every branch).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::cluster::{ClusterError, ClusterOptions, LocalCluster};
use crate::discovery::Addresses;
use crate::input::Input;
use crate::output;
use crate::replay::{self, BranchClients, EventTiming, ReplayError, ReplayOptions, WaitError};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Wait(#[from] WaitError),
}

/// The figures of one run.
#[derive(Debug, Clone)]
pub struct RunFigures {
    pub start: Duration,
    pub replay: Duration,
    pub stop: Duration,
    pub total: Duration,
    pub timings: Vec<EventTiming>,
    /// The rendered output, to check runs agree.
    pub output: String,
}

/// One complete local run, timed phase by phase.
pub async fn run_once(
    input: &Input,
    cluster: &ClusterOptions,
    replay_options: &ReplayOptions,
) -> Result<RunFigures, BenchError> {
    let started = Instant::now();
    let ids = input.branch_ids();
    let options = ClusterOptions {
        host: IpAddr::from([127, 0, 0, 1]),
        base_port: None,
        ..cluster.clone()
    };
    let local = LocalCluster::start(&ids, input.initial_balance(), &options).await?;
    let result = async {
        local.wait_ready(Duration::from_secs(60)).await?;
        let addresses = Addresses::Static(
            local
                .customer_addrs()
                .into_iter()
                .map(|(id, a)| (id, format!("http://{a}")))
                .collect(),
        );
        let clients = BranchClients::new(&addresses, &ids, Duration::from_secs(2))?;
        replay::wait_until_serving(&clients, Duration::from_secs(10)).await?;
        let start = started.elapsed();
        let (outputs, timings) = replay::replay_timed(input, &clients, replay_options).await?;
        let rendered = output::render(&outputs);
        Ok::<_, BenchError>((start, started.elapsed() - start, timings, rendered))
    }
    .await;
    let stopping = Instant::now();
    local.shutdown().await?;
    let (start, replay, timings, output) = result?;
    Ok(RunFigures {
        start,
        replay,
        stop: stopping.elapsed(),
        total: started.elapsed(),
        timings,
        output,
    })
}

/// The `q`-quantile (0..=1) of sorted durations.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Peak resident set size of this process in KiB (Linux `VmHWM`), if known.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU time of this process so far (Linux, clock ticks of 10 ms).
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The report printed by `distbank bench`.
pub fn report(name: &str, branches: usize, events: usize, runs: &[RunFigures], cpu: Option<Duration>) -> String {
    let mut out = String::new();
    let mut totals: Vec<Duration> = runs.iter().map(|r| r.total).collect();
    totals.sort();
    let median = quantile(&totals, 0.5);
    let _ = writeln!(
        out,
        "bench {name}: {branches} branches, {events} events, {} run(s)",
        runs.len()
    );
    for (i, run) in runs.iter().enumerate() {
        let _ = writeln!(
            out,
            "  run {}: start {:.1} ms, replay {:.1} ms, stop {:.1} ms, total {:.1} ms",
            i + 1,
            ms(run.start),
            ms(run.replay),
            ms(run.stop),
            ms(run.total)
        );
    }
    let replay_median = {
        let mut r: Vec<Duration> = runs.iter().map(|r| r.replay).collect();
        r.sort();
        quantile(&r, 0.5)
    };
    let _ = writeln!(
        out,
        "  total: median {:.1} ms, min {:.1} ms, max {:.1} ms; replay median {:.1} ms = {:.0} events/s",
        ms(median),
        ms(totals.first().copied().unwrap_or_default()),
        ms(totals.last().copied().unwrap_or_default()),
        ms(replay_median),
        events as f64 / replay_median.as_secs_f64().max(1e-9)
    );
    let mut by_kind: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for timing in runs.iter().flat_map(|r| &r.timings) {
        by_kind
            .entry(timing.operation.interface())
            .or_default()
            .push(timing.latency);
    }
    for (kind, mut latencies) in by_kind {
        latencies.sort();
        let _ = writeln!(
            out,
            "  {kind:<8} n={:<6} p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            latencies.len(),
            ms(quantile(&latencies, 0.5)),
            ms(quantile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default())
        );
    }
    if let Some(rss) = peak_rss_kib() {
        let _ = writeln!(
            out,
            "  peak RSS {:.1} MiB (whole process: every branch and the replay)",
            rss as f64 / 1024.0
        );
    }
    if let Some(cpu) = cpu {
        let _ = writeln!(
            out,
            "  CPU time {:.0} ms over all runs ({:.1} ms per run)",
            ms(cpu),
            ms(cpu) / runs.len().max(1) as f64
        );
    }
    out
}
