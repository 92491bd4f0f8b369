//! Calibration for `distbank bench --concurrent`: what the same closed-loop clients reach
//! against servers that do no work at all, on this machine.
//!
//! The servers are a branch's customer server ([`distbank::branch::customer_router`]: the
//! same per-connection limit and message caps, health beside the Bank service; nodelay on the
//! accepted sockets, as a branch sets it) but answer every `MsgDelivery` at once, without
//! replication; the clients are the bench's (one lazily connected channel per branch,
//! [`distbank::replay::send_event`] with an event id). The figure is the ceiling for
//! unary customer calls here: no replicated bank on the same wire API can beat it.
//!
//! ```sh
//! cargo run --release --example grpc_ceiling -- [CLIENTS] [SERVERS] [SECONDS]   # 64 5 10
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use distbank::account::Operation;
use distbank::branch::customer_router;
use distbank::discovery::Addresses;
use distbank::input::Event;
use distbank::proto::bank::bank_server::Bank;
use distbank::proto::bank::{TransactionRequest, TransactionResponse};
use distbank::replay::{self, BranchClients, ReplayOptions};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Answers every request at once: success, balance 0.
struct Instant0;

#[tonic::async_trait]
impl Bank for Instant0 {
    async fn msg_delivery(&self, _: Request<TransactionRequest>) -> Result<Response<TransactionResponse>, Status> {
        Ok(Response::new(TransactionResponse {
            status: distbank::proto::STATUS_SUCCESS.to_string(),
            balance: 0,
        }))
    }
}

fn arg(n: usize, default: u64) -> anyhow::Result<u64> {
    match std::env::args().nth(n) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .with_context(|| format!("argument {n}: expected a number, got {s:?}")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clients = arg(1, 64)?;
    let servers = arg(2, 5)?.max(1);
    let duration = Duration::from_secs(arg(3, 10)?);

    let mut addresses = BTreeMap::new();
    for id in 1..=servers {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addresses.insert(id, format!("http://{}", listener.local_addr()?));
        let (_reporter, health) = tonic_health::server::health_reporter();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(customer_router(Server::builder(), health, Instant0).serve_with_incoming(incoming));
    }
    let ids: Vec<u64> = addresses.keys().copied().collect();
    let handles = BranchClients::new(&Addresses::Static(addresses), &ids, Duration::from_secs(2))?;

    let answered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu_before = distbank::bench::cpu_time();
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let handles = handles.clone();
            let (answered, failed) = (answered.clone(), failed.clone());
            let options = ReplayOptions::default();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let branch = 1 + (client + n) % servers;
                    let Some(mut bank) = handles.bank_client(branch) else {
                        break;
                    };
                    let event = Event {
                        id: client << 40 | n,
                        operation: if n % 10 < 7 {
                            Operation::Deposit(1)
                        } else {
                            Operation::Query
                        },
                    };
                    n += 1;
                    match replay::send_event(&mut bank, branch, &event, &options).await {
                        Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    let ops = answered.load(Ordering::Relaxed);
    let cpu = match (cpu_before, distbank::bench::cpu_time()) {
        (Some(before), Some(after)) => format!(
            ", CPU {:.1} µs per call",
            (after - before).as_secs_f64() * 1e6 / ops.max(1) as f64
        ),
        _ => String::new(),
    };
    println!(
        "grpc ceiling: {clients} clients, {servers} no-op servers, {:.1} s: {ops} calls, {:.0} calls/s, {} errors{cpu}",
        elapsed.as_secs_f64(),
        ops as f64 / elapsed.as_secs_f64(),
        failed.load(Ordering::Relaxed),
    );
    Ok(())
}
