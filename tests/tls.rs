//! TLS: `distbank branch --peer-tls-dir` (mutual TLS between branches) and
//! `--customer-tls-dir` (TLS on the customer API, with `--health-listen` for plaintext probes).
//! Real branch processes with certificates from a test CA; the replay verifies the branches with
//! `--tls-ca`'s logic; clients without the right certificate are refused and change nothing.

mod support;

#[path = "support/processes.rs"]
mod processes;

use std::path::{Path, PathBuf};
use std::time::Duration;

use distbank::discovery::Addresses;
use distbank::output::Recv;
use distbank::proto::bank::TransactionRequest;
use distbank::proto::bank::bank_client::BankClient;
use distbank::proto::peer::peer_client::PeerClient;
use distbank::proto::peer::{Operation as PeerOperation, SubmitRequest, Write};
use distbank::replay::{self, BranchClients, ReplayOptions};
use processes::{BranchProcess, BranchSpec, free_ports};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const WAIT: Duration = Duration::from_secs(90);

/// A CA and one certificate it signed (for 127.0.0.1 and localhost, server and client use).
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn new_pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} branch"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).expect("certificate");
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A directory laid out like a Kubernetes TLS Secret.
fn secret_dir(parent: &Path, name: &str, pki: &Pki) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("tls.crt"), &pki.cert_pem).expect("write");
    std::fs::write(dir.join("tls.key"), &pki.key_pem).expect("write");
    std::fs::write(dir.join("ca.crt"), &pki.ca_pem).expect("write");
    dir
}

/// A branch's TLS flags: one Secret directory for both sides, the directory re-read every
/// second (`renewed_certificates_are_used_without_a_restart`), plaintext health for probes.
fn tls_args(secrets: &Path, health_port: u16) -> Vec<String> {
    vec![
        "--peer-tls-dir".into(),
        secrets.display().to_string(),
        "--customer-tls-dir".into(),
        secrets.display().to_string(),
        "--tls-reload-secs".into(),
        "1".into(),
        "--health-listen".into(),
        format!("127.0.0.1:{health_port}"),
    ]
}

/// Replaces `file` in `dir` the way the kubelet updates a mounted Secret: the new content
/// appears whole (rename), one file after another.
fn replace(dir: &Path, file: &str, content: &str) {
    let staged = dir.join(format!(".{file}.new"));
    std::fs::write(&staged, content).expect("write");
    std::fs::rename(&staged, dir.join(file)).expect("rename");
}

struct TlsCluster {
    branches: Vec<BranchProcess>,
    peer_ports: Vec<u16>,
    health_ports: Vec<u16>,
    metrics_ports: Vec<u16>,
}

/// Three branches of `input` with mutual TLS between them and TLS on the customer API.
fn start_tls_cluster(dir: &Path, input: &Path, pki: &Pki) -> TlsCluster {
    let secrets = secret_dir(dir, "tls", pki);
    let ports = free_ports(12);
    let (customer_ports, rest) = ports.split_at(3);
    let (peer_ports, rest) = rest.split_at(3);
    let (health_ports, metrics_ports) = rest.split_at(3);
    let peers = (0..3)
        .map(|i| format!("{}=127.0.0.1:{}", i + 1, peer_ports[i]))
        .collect::<Vec<_>>()
        .join(",");
    let branches = (0..3)
        .map(|i| {
            let id = i as u64 + 1;
            BranchProcess::start(BranchSpec {
                id,
                input: input.to_path_buf(),
                customer_port: customer_ports[i],
                peer_port: peer_ports[i],
                peers: peers.clone(),
                data_dir: dir.join(format!("data-{id}")),
                log: dir.join(format!("branch-{id}.log")),
                args: [
                    tls_args(&secrets, health_ports[i]),
                    vec!["--metrics-listen".into(), format!("127.0.0.1:{}", metrics_ports[i])],
                ]
                .concat(),
            })
        })
        .collect();
    TlsCluster {
        branches,
        peer_ports: peer_ports.to_vec(),
        health_ports: health_ports.to_vec(),
        metrics_ports: metrics_ports.to_vec(),
    }
}

impl TlsCluster {
    /// Waits for SERVING on the plaintext health ports, as a kubelet's gRPC probe would.
    async fn wait_serving(&self) {
        let addresses = Addresses::Static(
            self.health_ports
                .iter()
                .enumerate()
                .map(|(i, port)| (i as u64 + 1, format!("127.0.0.1:{port}")))
                .collect(),
        );
        let clients = BranchClients::new(&addresses, &[1, 2, 3], Duration::from_secs(2)).expect("clients");
        if let Err(e) = replay::wait_until_serving(&clients, WAIT).await {
            let logs: Vec<String> = self
                .branches
                .iter()
                .map(|b| format!("--- branch {}:\n{}", b.spec.id, processes::tail(&b.log_text(), 3000)))
                .collect();
            panic!("{e}\n{}", logs.join("\n"));
        }
    }

    fn customer_addresses(&self) -> Addresses {
        Addresses::Static(
            self.branches
                .iter()
                .map(|b| (b.spec.id, format!("127.0.0.1:{}", b.spec.customer_port)))
                .collect(),
        )
    }

    fn customer_clients(&self, ca_pem: &str) -> BranchClients {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        BranchClients::with_tls(
            &self.customer_addresses(),
            &[1, 2, 3],
            Duration::from_secs(2),
            Some(&tls),
        )
        .expect("clients")
    }
}

async fn deposit(client: &mut BankClient<tonic::transport::Channel>, amount: i32) -> Result<String, tonic::Status> {
    Ok(support::call(client, None, "deposit", amount).await?.status)
}

async fn query(client: &mut BankClient<tonic::transport::Channel>) -> Result<i32, tonic::Status> {
    let request = TransactionRequest {
        customer_id: 1,
        operation: "query".into(),
        amount: 0,
    };
    Ok(client.msg_delivery(request).await?.into_inner().balance)
}

/// A peer-API client to `port` over TLS that trusts `ca_pem`, presenting `identity` if any.
async fn peer_client(
    port: u16,
    ca_pem: &str,
    identity: Option<&Pki>,
) -> Result<PeerClient<tonic::transport::Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(pki) = identity {
        tls = tls.identity(Identity::from_pem(&pki.cert_pem, &pki.key_pem));
    }
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(PeerClient::new(channel))
}

async fn submit_deposit(
    client: &mut PeerClient<tonic::transport::Channel>,
    event_id: Option<u64>,
    amount: u64,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(SubmitRequest {
        writes: vec![Write {
            event_id,
            operation: PeerOperation::Deposit as i32,
            amount,
            traceparent: String::new(),
        }],
        sender: None,
    });
    request.set_timeout(Duration::from_secs(10));
    client.submit(request).await.map(|_| ())
}

#[tokio::test]
async fn branches_replicate_over_mutual_tls_and_the_replay_verifies_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = new_pki("distbank test");
    let input_path = support::fixture("spec_3_input.json");
    let cluster = start_tls_cluster(dir.path(), &input_path, &pki);
    cluster.wait_serving().await;

    // The course's spec example, over TLS end to end: replay → customer API (TLS) → leader
    // (peer mutual TLS) → every replica.
    let input = distbank::input::load(&input_path).expect("input");
    let clients = cluster.customer_clients(&pki.ca_pem);
    let outputs = replay::replay(&input, &clients, &ReplayOptions::default())
        .await
        .expect("replay over TLS");
    let recv: Vec<Vec<Recv>> = outputs.into_iter().map(|o| o.recv).collect();
    assert_eq!(
        recv,
        vec![
            vec![Recv::Query { balance: 400 }],
            vec![Recv::Deposit { success: true }, Recv::Query { balance: 570 }],
            vec![Recv::Withdraw { success: true }, Recv::Query { balance: 500 }],
        ]
    );
    for id in 1..=3 {
        let mut client = clients.bank_client(id).expect("client");
        assert_eq!(query(&mut client).await.expect("query over TLS"), 500, "branch {id}");
    }
}

#[tokio::test]
async fn clients_without_the_right_certificate_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = new_pki("distbank test");
    let rogue = new_pki("rogue");
    let input_path = processes::write_input(dir.path(), 3, 400);
    let cluster = start_tls_cluster(dir.path(), &input_path, &pki);
    cluster.wait_serving().await;
    let clients = cluster.customer_clients(&pki.ca_pem);

    // The control: a client with a certificate from the branches' CA is a peer, and the leader
    // accepts its Submit (the others refuse: not the leader). Its port is the one to attack.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut leader_port = None;
    while leader_port.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no branch accepted the member's Submit"
        );
        for &port in &cluster.peer_ports {
            let Ok(mut client) = peer_client(port, &pki.ca_pem, Some(&pki)).await else {
                continue;
            };
            // An event id: a retry after a lost answer does not deposit twice.
            if submit_deposit(&mut client, Some(1_000_001), 1).await.is_ok() {
                leader_port = Some(port);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let port = leader_port.expect("leader found");
    let bank = clients.bank_client(1).expect("client");
    support::eventually(WAIT, "the member's deposit applied", || {
        let mut bank = bank.clone();
        async move { query(&mut bank).await.ok() == Some(401) }
    })
    .await;

    // No client certificate, or one from another CA: the handshake (or the first call) fails.
    for (what, identity) in [
        ("no client certificate", None),
        ("a rogue CA's certificate", Some(&rogue)),
    ] {
        let refused = match peer_client(port, &pki.ca_pem, identity).await {
            Err(_) => true,
            Ok(mut client) => submit_deposit(&mut client, None, 1_000_000).await.is_err(),
        };
        assert!(refused, "a peer client with {what} was accepted");
    }
    // Plaintext to the mutual-TLS peer port.
    let plaintext = match PeerClient::connect(format!("http://127.0.0.1:{port}")).await {
        Err(_) => true,
        Ok(mut client) => submit_deposit(&mut client, None, 1_000_000).await.is_err(),
    };
    assert!(plaintext, "a plaintext peer client was accepted");
    // Each refusal is counted on the attacked branch's peer listener.
    let index = cluster
        .peer_ports
        .iter()
        .position(|p| *p == port)
        .expect("a branch's port");
    let metrics = support::scrape(&format!("127.0.0.1:{}", cluster.metrics_ports[index]), WAIT).await;
    let failures = format!(
        r#"distbank_tls_handshake_failures_total{{branch="{}",listener="peer"}}"#,
        index + 1
    );
    assert!(
        metrics.get(&failures).is_some_and(|count| *count >= 3.0),
        "{failures} after three refused clients: {metrics:#?}"
    );

    // Customers: plaintext, or a client that trusts another CA, get nowhere.
    let plain = Addresses::Static(
        cluster
            .branches
            .iter()
            .map(|b| (b.spec.id, format!("http://127.0.0.1:{}", b.spec.customer_port)))
            .collect(),
    );
    let plain = BranchClients::new(&plain, &[1], Duration::from_secs(2)).expect("clients");
    let mut plain = plain.bank_client(1).expect("client");
    assert!(query(&mut plain).await.is_err(), "plaintext customer call accepted");
    let mut wrong_ca = cluster.customer_clients(&rogue.ca_pem).bank_client(1).expect("client");
    assert!(
        query(&mut wrong_ca).await.is_err(),
        "a client that does not trust the branches' CA got an answer"
    );

    // Nothing the refused clients sent was applied, on any branch.
    for id in 1..=3 {
        let mut client = clients.bank_client(id).expect("client");
        assert_eq!(query(&mut client).await.expect("query"), 401, "branch {id}");
    }
}

/// cert-manager renews a certificate by rewriting its Secret; the branches must use the new one
/// without a restart, or they fail once the old one expires. Here the renewal also moves to a
/// new CA, the harder case: the directory first trusts both CAs, and then a branch restarted
/// with a Secret that trusts only the new CA must still rejoin, which it can only if its
/// peers present their renewed certificates when they connect to it (their client side), and
/// on their listeners (their server side).
#[tokio::test]
async fn renewed_certificates_are_used_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = new_pki("old");
    let new = new_pki("new");
    let input_path = processes::write_input(dir.path(), 3, 400);
    let mut cluster = start_tls_cluster(dir.path(), &input_path, &old);
    cluster.wait_serving().await;
    let mut before = cluster.customer_clients(&old.ca_pem).bank_client(1).expect("client");
    assert_eq!(deposit(&mut before, 10).await.expect("deposit"), "success");

    // The Secret is renewed: a certificate from the new CA, and a CA bundle trusting both.
    let secrets = dir.path().join("tls");
    replace(&secrets, "ca.crt", &format!("{}{}", old.ca_pem, new.ca_pem));
    replace(&secrets, "tls.crt", &new.cert_pem);
    replace(&secrets, "tls.key", &new.key_pem);

    // Customers who trust only the new CA reach every branch: the customer listeners present
    // the renewed certificate (and the connection opened before the renewal still works).
    for id in 1..=3 {
        support::eventually(WAIT, &format!("branch {id} presents the renewed certificate"), || {
            let clients = cluster.customer_clients(&new.ca_pem);
            async move {
                let mut client = clients.bank_client(id).expect("client");
                query(&mut client).await.ok() == Some(410)
            }
        })
        .await;
    }
    assert_eq!(query(&mut before).await.expect("the old connection"), 410);

    // Branch 3 restarts with a Secret that trusts only the new CA.
    let only_new = secret_dir(dir.path(), "tls-new", &new);
    let health_port = cluster.health_ports[2];
    cluster.branches[2].spec.args = tls_args(&only_new, health_port);
    cluster.branches[2].restart();
    cluster.wait_serving().await;
    let clients = cluster.customer_clients(&new.ca_pem);
    let mut third = clients.bank_client(3).expect("client");
    assert_eq!(deposit(&mut third, 5).await.expect("deposit at branch 3"), "success");
    for id in 1..=3 {
        let mut client = clients.bank_client(id).expect("client");
        assert_eq!(query(&mut client).await.expect("query"), 415, "branch {id}");
    }
    assert!(
        cluster.branches[0]
            .log_text()
            .contains("TLS certificates changed on disk"),
        "the reload is not logged"
    );
}

#[test]
fn a_branch_with_a_broken_certificate_refuses_to_start_and_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = processes::write_input(dir.path(), 1, 0);
    let secrets = dir.path().join("tls");
    std::fs::create_dir_all(&secrets).expect("mkdir");
    std::fs::write(secrets.join("tls.crt"), "garbage").expect("write");
    std::fs::write(secrets.join("tls.key"), "garbage").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_distbank"))
        .args([
            "branch",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--peer-listen",
            "127.0.0.1:0",
        ])
        .arg("--input")
        .arg(&input)
        .arg("--peers")
        .arg("1=127.0.0.1:1")
        .arg("--peer-tls-dir")
        .arg(&secrets)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--peer-tls-dir") && stderr.contains("tls.crt"),
        "{stderr}"
    );
}
