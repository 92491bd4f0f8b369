//! A test network for `distbank branch` processes: one TCP proxy per ordered pair of branches
//! (branch A reaches branch B at the proxy for A→B), so a partition is exact: the proxies to
//! and from a cut-off branch refuse new connections and drop open ones.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::processes::{self, BranchProcess, BranchSpec, free_ports};

/// Starts branch processes 1..=`count` (input, data directories and logs in `dir`, every
/// branch holding `balance`) whose peer traffic goes through a new [`Network`]; `args(id)`:
/// the extra arguments of branch `id`.
pub async fn start_branches(
    dir: &Path,
    count: u64,
    balance: u64,
    args: impl Fn(u64) -> Vec<String>,
) -> (Network, Vec<BranchProcess>) {
    let input = processes::write_input(dir, count, balance);
    let ports = free_ports(2 * count as usize);
    let customer_port = |id: u64| ports[id as usize - 1];
    let peer_ports: BTreeMap<u64, u16> = (1..=count).map(|id| (id, ports[(count + id) as usize - 1])).collect();
    let (network, peers) = Network::start(&peer_ports).await;
    let branches = (1..=count)
        .map(|id| {
            BranchProcess::start(BranchSpec {
                id,
                input: input.clone(),
                customer_port: customer_port(id),
                peer_port: peer_ports[&id],
                peers: peers[&id].clone(),
                data_dir: dir.join(format!("data-{id}")),
                log: dir.join(format!("branch-{id}.log")),
                args: args(id),
            })
        })
        .collect();
    (network, branches)
}

/// One direction of one branch pair. `open` and the token are changed together under the lock,
/// so no connection slips through a partition.
struct Link {
    from: u64,
    to: u64,
    state: Mutex<(bool, CancellationToken)>,
    /// Cancelled to turn the open connections into black holes ([`Network::freeze`]).
    freeze: Mutex<CancellationToken>,
}

pub struct Network {
    links: Vec<Arc<Link>>,
    stop: CancellationToken,
}

impl Network {
    /// Starts a proxy for every ordered pair; returns the network and each branch's `--peers`.
    pub async fn start(peer_ports: &BTreeMap<u64, u16>) -> (Network, BTreeMap<u64, String>) {
        let stop = CancellationToken::new();
        let mut links = Vec::new();
        let mut peers: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (&from, &own_port) in peer_ports {
            for (&to, &to_port) in peer_ports {
                if from == to {
                    peers
                        .entry(from)
                        .or_default()
                        .push(format!("{from}=127.0.0.1:{own_port}"));
                    continue;
                }
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
                let port = listener.local_addr().expect("addr").port();
                peers.entry(from).or_default().push(format!("{to}=127.0.0.1:{port}"));
                let link = Arc::new(Link {
                    from,
                    to,
                    state: Mutex::new((true, CancellationToken::new())),
                    freeze: Mutex::new(CancellationToken::new()),
                });
                let target: SocketAddr = ([127, 0, 0, 1], to_port).into();
                tokio::spawn(proxy(listener, target, link.clone(), stop.clone()));
                links.push(link);
            }
        }
        let peers = peers.into_iter().map(|(id, list)| (id, list.join(","))).collect();
        (Network { links, stop }, peers)
    }

    /// Cuts `branch` off: nothing to or from it gets through until [`Network::heal`].
    pub fn isolate(&self, branch: u64) {
        for link in self.links.iter().filter(|l| l.from == branch || l.to == branch) {
            let mut state = link.state.lock().expect("link");
            state.0 = false;
            state.1.cancel();
            state.1 = CancellationToken::new();
        }
    }

    /// Every connection now open to or from `branch` stops carrying bytes but stays open, as
    /// a connection does when the machine at its other end vanishes without closing it (a node
    /// failure, a pod whose network went first): only keepalive or a timeout can tell. New
    /// connections go through as before.
    pub fn freeze(&self, branch: u64) {
        for link in self.links.iter().filter(|l| l.from == branch || l.to == branch) {
            let mut freeze = link.freeze.lock().expect("link");
            freeze.cancel();
            *freeze = CancellationToken::new();
        }
    }

    pub fn heal(&self) {
        for link in &self.links {
            link.state.lock().expect("link").0 = true;
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn proxy(listener: TcpListener, target: SocketAddr, link: Arc<Link>, stop: CancellationToken) {
    loop {
        let mut inbound = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let cut = {
            let state = link.state.lock().expect("link");
            if !state.0 {
                continue; // dropping `inbound` refuses the connection
            }
            state.1.clone()
        };
        let freeze = link.freeze.lock().expect("link").clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return; // the target is down: the caller sees the connection close
            };
            let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = stop.cancelled() => {}
                // Held open, carrying nothing, until the network stops.
                _ = freeze.cancelled() => stop.cancelled().await,
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            }
        });
    }
}
