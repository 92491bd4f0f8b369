//! `distbank bench`: repeatable figures for the whole local run (start-up, replay, output,
//! shutdown) of one input: wall time, events/s, per-operation latency percentiles, peak RSS
//! and CPU time of the process (which hosts every branch).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::cluster::{ClusterError, ClusterOptions, LocalCluster};
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
        let addresses = local.customer_addresses();
        let clients = BranchClients::new(&addresses, &ids, Duration::from_secs(2))?;
        replay::wait_until_serving(&clients, Duration::from_secs(10)).await?;
        let start = started.elapsed();
        let (outputs, timings) = replay::replay_timed(input, &clients, replay_options).await?;
        // As `distbank run` does: every replica has the final balance before the stop.
        local.wait_converged(Duration::from_secs(10)).await;
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
    let timings: Vec<EventTiming> = runs.iter().flat_map(|r| r.timings.iter().copied()).collect();
    latency_lines(&mut out, &timings);
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

/// `input` in the course's input format (customers first, then branches, as the course files
/// are laid out), so a generated workload can be saved and replayed by other implementations.
pub fn input_json(input: &Input) -> String {
    use crate::account::Operation;
    let mut items = Vec::with_capacity(input.customers.len() + input.branches.len());
    for customer in &input.customers {
        let events: Vec<_> = customer
            .events
            .iter()
            .map(|event| match event.operation {
                Operation::Deposit(money) | Operation::Withdraw(money) => serde_json::json!({
                    "id": event.id, "interface": event.operation.interface(), "money": money
                }),
                Operation::Query => serde_json::json!({"id": event.id, "interface": "query"}),
            })
            .collect();
        items.push(serde_json::json!({"id": customer.id, "type": "customer", "events": events}));
    }
    for branch in &input.branches {
        items.push(serde_json::json!({"id": branch.id, "type": "branch", "balance": branch.balance}));
    }
    let mut text = serde_json::to_string_pretty(&items).unwrap_or_default();
    text.push('\n');
    text
}

/// A deterministic generated workload: `branches` branches at balance 1000 and `events` events
/// spread over customer items of 1-10 events (deposits, withdrawals of which many overdraw,
/// queries), customer ids cycling over the branches. The same seed gives the same input.
pub fn generated_input(branches: u64, events: u64, seed: u64) -> Input {
    use crate::account::Operation;
    use crate::input::{BranchSpec, CustomerSpec, Event};
    let mut state = seed | 1;
    let mut next = move |bound: u64| {
        // xorshift64*: small, deterministic, good enough to mix a workload.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound.max(1)
    };
    let mut customers = Vec::new();
    let mut event_id = 1;
    let mut customer = 0;
    while event_id <= events {
        let len = (1 + next(10)).min(events - event_id + 1);
        let customer_events = (0..len)
            .map(|_| {
                let operation = match next(10) {
                    0..=3 => Operation::Deposit(1 + next(100)),
                    4..=6 => Operation::Withdraw(1 + next(400)),
                    _ => Operation::Query,
                };
                let event = Event {
                    id: event_id,
                    operation,
                };
                event_id += 1;
                event
            })
            .collect();
        customers.push(CustomerSpec {
            id: 1 + customer % branches.max(1),
            events: customer_events,
        });
        customer += 1;
    }
    Input {
        branches: (1..=branches.max(1))
            .map(|id| BranchSpec { id, balance: 1000 })
            .collect(),
        customers,
    }
}

/// Figures of one concurrent run.
#[derive(Debug, Clone)]
pub struct ConcurrentFigures {
    pub clients: usize,
    pub branches: u64,
    pub elapsed: Duration,
    /// Every answered operation.
    pub operations: u64,
    /// A uniform sample of the answered operations' latencies (at most
    /// [`LATENCY_SAMPLES_PER_CLIENT`] per client, so a long soak keeps the harness's memory flat).
    pub timings: Vec<EventTiming>,
    pub errors: u64,
    /// The process's resident memory (all branches and the clients) over time.
    pub samples: Vec<Sample>,
}

/// One point of a concurrent run's timeline.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Duration,
    /// Operations answered and failed since the previous sample.
    pub operations: u64,
    pub errors: u64,
    pub rss_kib: Option<u64>,
    /// Allocated and not freed (see [`heap_in_use_bytes`]).
    pub heap_bytes: Option<u64>,
    /// The idempotency table's size on branch 1 (bounded by `account::IDEMPOTENCY_WINDOW`).
    pub recorded_events: usize,
    /// Branch 1's table of query answers by event id (bounded the same way).
    pub recorded_queries: usize,
}

pub const LATENCY_SAMPLES_PER_CLIENT: usize = 2_000;

/// Bytes the allocator has handed out and not got back (glibc `mallinfo2`: `uordblks` plus
/// `hblkhd`), if known. Beside RSS it tells real growth (this rises) from memory the allocator
/// keeps for reuse after large short-lived buffers such as snapshots (only RSS rises).
pub fn heap_in_use_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's `struct mallinfo2` (glibc >= 2.33): ten size_t fields, two of them read here.
        #[allow(dead_code)]
        #[repr(C)]
        struct MallInfo2 {
            arena: usize,
            ordblks: usize,
            smblks: usize,
            hblks: usize,
            hblkhd: usize,
            usmblks: usize,
            fsmblks: usize,
            uordblks: usize,
            fordblks: usize,
            keepcost: usize,
        }
        unsafe extern "C" {
            fn mallinfo2() -> MallInfo2;
        }
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it only
        // reads the allocator's own counters (under its locks).
        let info = unsafe { mallinfo2() };
        Some((info.uordblks + info.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Resident set size of this process now, in KiB (Linux `VmRSS`), if known.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `clients` concurrent customers send random operations (event ids, so retries are safe) to
/// random branches of a fresh `branches`-branch cluster for `duration`, at full speed (a closed
/// loop: each client sends its next operation when the previous one is answered). Every
/// `sample_every` the process's RSS and the throughput are recorded (and printed to stderr, so
/// a long soak shows it is alive).
pub async fn run_concurrent(
    clients: usize,
    branches: u64,
    duration: Duration,
    sample_every: Duration,
    cluster: &ClusterOptions,
) -> Result<ConcurrentFigures, BenchError> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use crate::account::Operation;
    use crate::input::Event;

    let ids: Vec<u64> = (1..=branches.max(1)).collect();
    let local = LocalCluster::start(&ids, 1_000_000, cluster).await?;
    let answered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let result = async {
        local.wait_ready(Duration::from_secs(60)).await?;
        let addresses = local.customer_addresses();
        let clients_handle = BranchClients::new(&addresses, &ids, Duration::from_secs(2))?;
        replay::wait_until_serving(&clients_handle, Duration::from_secs(10)).await?;
        let options = ReplayOptions::default();
        let started = Instant::now();
        let deadline = started + duration;
        let tasks: Vec<_> = (0..clients)
            .map(|client| {
                let handles = clients_handle.clone();
                let options = options.clone();
                let branch_count = ids.len() as u64;
                let (answered, failed) = (answered.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ (client as u64 + 1);
                    let mut next = move |bound: u64| {
                        state ^= state >> 12;
                        state ^= state << 25;
                        state ^= state >> 27;
                        state.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound.max(1)
                    };
                    let mut timings = Vec::new();
                    let (mut n, mut seen) = (0u64, 0u64);
                    while Instant::now() < deadline {
                        let branch = 1 + next(branch_count);
                        let Some(mut bank) = handles.bank_client(branch) else {
                            break;
                        };
                        let operation = match next(10) {
                            0..=3 => Operation::Deposit(1 + next(100)),
                            4..=6 => Operation::Withdraw(1 + next(100)),
                            _ => Operation::Query,
                        };
                        let event = Event {
                            id: (client as u64) << 40 | n,
                            operation,
                        };
                        n += 1;
                        let sent = Instant::now();
                        match replay::send_event(&mut bank, branch, &event, &options).await {
                            Ok(_) => {
                                answered.fetch_add(1, Ordering::Relaxed);
                                seen += 1;
                                let timing = EventTiming {
                                    operation,
                                    latency: sent.elapsed(),
                                };
                                // Reservoir sampling (Algorithm R): a uniform sample of all
                                // this client's answers in bounded memory.
                                if timings.len() < LATENCY_SAMPLES_PER_CLIENT {
                                    timings.push(timing);
                                } else {
                                    let slot = next(seen) as usize;
                                    if slot < LATENCY_SAMPLES_PER_CLIENT {
                                        timings[slot] = timing;
                                    }
                                }
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    timings
                })
            })
            .collect();
        let stop_sampling = tokio_util::sync::CancellationToken::new();
        let sampler = {
            let (answered, failed) = (answered.clone(), failed.clone());
            let first = local.branches().first().map(|b| b.branch.clone());
            let stop = stop_sampling.clone();
            async move {
                let mut samples = Vec::new();
                let (mut last_answered, mut last_failed) = (0, 0);
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::from_std(started + sample_every), sample_every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => break,
                    }
                    let at = started.elapsed();
                    let (now_answered, now_failed) = (answered.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
                    let sample = Sample {
                        at,
                        operations: now_answered - last_answered,
                        errors: now_failed - last_failed,
                        rss_kib: rss_kib(),
                        heap_bytes: heap_in_use_bytes(),
                        recorded_events: first.as_ref().map_or(0, |b| b.recorded_events()),
                        recorded_queries: first.as_ref().map_or(0, |b| b.recorded_queries()),
                    };
                    (last_answered, last_failed) = (now_answered, now_failed);
                    eprintln!("{}", sample_line(&sample, sample_every));
                    samples.push(sample);
                }
                samples
            }
        };
        let sampler = tokio::spawn(sampler);
        let mut timings = Vec::new();
        for task in tasks {
            if let Ok(t) = task.await {
                timings.extend(t);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let elapsed = started.elapsed();
        stop_sampling.cancel();
        let samples = sampler.await.unwrap_or_default();
        Ok::<_, BenchError>((elapsed, timings, samples))
    }
    .await;
    local.shutdown().await?;
    let (elapsed, timings, samples) = result?;
    Ok(ConcurrentFigures {
        clients,
        branches,
        elapsed,
        operations: answered.load(std::sync::atomic::Ordering::Relaxed),
        timings,
        errors: failed.load(std::sync::atomic::Ordering::Relaxed),
        samples,
    })
}

/// Latency lines by operation kind.
fn latency_lines(out: &mut String, timings: &[EventTiming]) {
    let mut by_kind: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for timing in timings {
        by_kind
            .entry(timing.operation.interface())
            .or_default()
            .push(timing.latency);
    }
    for (kind, mut latencies) in by_kind {
        latencies.sort();
        let _ = writeln!(
            out,
            "  {kind:<8} n={:<7} p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            latencies.len(),
            ms(quantile(&latencies, 0.5)),
            ms(quantile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default())
        );
    }
}

/// The report of a concurrent run.
pub fn concurrent_report(figures: &ConcurrentFigures, cpu: Option<Duration>) -> String {
    let mut out = String::new();
    let ops = figures.operations;
    let _ = writeln!(
        out,
        "bench concurrent: {} clients, {} branches, {:.1} s: {ops} operations, {:.0} ops/s, {} errors",
        figures.clients,
        figures.branches,
        figures.elapsed.as_secs_f64(),
        ops as f64 / figures.elapsed.as_secs_f64().max(1e-9),
        figures.errors
    );
    if figures.timings.len() as u64 != ops {
        let _ = writeln!(
            out,
            "  latencies from a uniform sample of {} operations",
            figures.timings.len()
        );
    }
    latency_lines(&mut out, &figures.timings);
    let mut all: Vec<Duration> = figures.timings.iter().map(|t| t.latency).collect();
    all.sort();
    let _ = writeln!(
        out,
        "  all      p50 {:.3} ms  p99 {:.3} ms",
        ms(quantile(&all, 0.5)),
        ms(quantile(&all, 0.99))
    );
    if let Some(rss) = peak_rss_kib() {
        let _ = writeln!(out, "  peak RSS {:.1} MiB", rss as f64 / 1024.0);
    }
    if let Some(cpu) = cpu {
        let _ = writeln!(out, "  CPU time {:.0} ms", ms(cpu));
    }
    if let [first, .., _] = figures.samples.as_slice() {
        let every = first.at;
        let _ = writeln!(out, "  timeline (every {:.0} s):", every.as_secs_f64());
        for sample in &figures.samples {
            let _ = writeln!(out, "  {}", sample_line(sample, every));
        }
    }
    // Start, half time and end: the half-time point is past the warm-up (tables filling up), so
    // half -> end is the plateau check.
    let samples = &figures.samples;
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let half = &samples[samples.len() / 2];
        let mib = |kib: Option<u64>| kib.unwrap_or(0) as f64 / 1024.0;
        let heap = |bytes: Option<u64>| bytes.unwrap_or(0) as f64 / (1024.0 * 1024.0);
        let _ = writeln!(
            out,
            "  RSS at {:.0} s {:.1} MiB, at {:.0} s {:.1} MiB, at {:.0} s {:.1} MiB; heap in use {:.1} / {:.1} / {:.1} MiB",
            first.at.as_secs_f64(),
            mib(first.rss_kib),
            half.at.as_secs_f64(),
            mib(half.rss_kib),
            last.at.as_secs_f64(),
            mib(last.rss_kib),
            heap(first.heap_bytes),
            heap(half.heap_bytes),
            heap(last.heap_bytes),
        );
        let window_ops: Vec<u64> = samples.iter().map(|s| s.operations).collect();
        let _ = writeln!(
            out,
            "  ops per sample min {} max {}",
            window_ops.iter().min().copied().unwrap_or(0),
            window_ops.iter().max().copied().unwrap_or(0),
        );
    }
    out
}

/// One timeline line: time, throughput in the window, errors, RSS, idempotency-table size.
pub fn sample_line(sample: &Sample, every: Duration) -> String {
    format!(
        "  t={:>6.0} s  {:>7.0} ops/s  errors {:<4} RSS {:>7.1} MiB  heap in use {:>7.1} MiB  recorded writes {} queries {}",
        sample.at.as_secs_f64(),
        sample.operations as f64 / every.as_secs_f64().max(1e-9),
        sample.errors,
        sample.rss_kib.unwrap_or(0) as f64 / 1024.0,
        sample.heap_bytes.unwrap_or(0) as f64 / (1024.0 * 1024.0),
        sample.recorded_events,
        sample.recorded_queries
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_input_saves_in_the_course_format_and_parses_back() {
        let input = generated_input(4, 60, 7);
        assert_eq!(input.event_count(), 60);
        let text = input_json(&input);
        let parsed = crate::input::parse(&text, "generated.json").expect("saved input parses");
        assert_eq!(parsed, input);
        // The same seed gives the same workload; another seed a different one.
        assert_eq!(generated_input(4, 60, 7), input);
        assert_ne!(generated_input(4, 60, 8), input);
    }
}
