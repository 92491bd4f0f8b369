//! The customer-facing API (the original `Bank/MsgDelivery`): what customers may do, what
//! they may not, and the right gRPC status codes; refused requests change nothing anywhere.

mod support;

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagate_operations_from_customers_are_refused_and_change_nothing() {
    let cluster = support::start_cluster(3, 100, 3).await;
    let clients = support::clients(&cluster);
    for branch in 1..=3 {
        let mut bank = support::bank_client(&clients, branch);
        for op in ["propagate_deposit", "propagate_withdraw"] {
            let status = support::call(&mut bank, Some(branch * 10), op, 50)
                .await
                .expect_err("refused");
            assert_eq!(status.code(), Code::PermissionDenied, "{op}: {status}");
            assert!(status.message().contains(op), "{status}");
        }
    }
    // A write after the refused ones commits; had any refused request changed a replica, the
    // replicas would now disagree.
    let mut bank = support::bank_client(&clients, 2);
    let reply = support::call(&mut bank, Some(1), "deposit", 1).await.expect("deposit");
    assert_eq!(reply.status, "success");
    support::replicas_converge(&cluster, 101).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_invalid_argument() {
    let cluster = support::start_cluster(2, 100, 3).await;
    let clients = support::clients(&cluster);
    let mut bank = support::bank_client(&clients, 1);
    for (op, amount, needle) in [
        ("transfer", 5, "transfer"),
        ("", 5, "expected"),
        ("DEPOSIT", 5, "DEPOSIT"),
        ("deposit", 0, "positive"),
        ("deposit", -5, "positive"),
        ("withdraw", -1, "positive"),
    ] {
        let status = support::call(&mut bank, None, op, amount).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{op} {amount}: {status}");
        assert!(status.message().contains(needle), "{op} {amount}: {status}");
    }
    let mut request = tonic::Request::new(distbank::proto::bank::TransactionRequest {
        customer_id: 1,
        operation: "query".into(),
        amount: 0,
    });
    request
        .metadata_mut()
        .insert(distbank::proto::EVENT_ID_METADATA, "seven".parse().expect("ascii"));
    let status = bank.msg_delivery(request).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains(distbank::proto::EVENT_ID_METADATA),
        "{status}"
    );
    support::replicas_converge(&cluster, 100).await;
    cluster.shutdown().await.expect("clean shutdown");
}

/// Found by the customer_request fuzz target: the whole operation was echoed in the status
/// message, and 4 KB of control characters grew (escaped, then percent-encoded) past the
/// client's header-list limit, so the client saw an HTTP/2 PROTOCOL_ERROR reset instead of
/// INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_hostile_operation_gets_invalid_argument_with_a_short_message() {
    let cluster = support::start_cluster(2, 100, 3).await;
    let clients = support::clients(&cluster);
    let mut bank = support::bank_client(&clients, 1);
    for operation in [
        "\u{1d}".repeat(4096),
        "x".repeat(16_000),
        format!("deposit{}", "\u{0}".repeat(4096)),
    ] {
        let status = support::call(&mut bank, None, &operation, 5)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{:.200}", status.message());
        assert!(
            status.message().len() < 512,
            "{} bytes: {:.200}",
            status.message().len(),
            status.message()
        );
        assert!(status.message().contains("bytes"), "{}", status.message());
    }
    support::replicas_converge(&cluster, 100).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdrawing_withdrawal_fails_everywhere_and_exact_balance_succeeds() {
    let cluster = support::start_cluster(4, 100, 3).await;
    let clients = support::clients(&cluster);
    let mut b4 = support::bank_client(&clients, 4);
    assert_eq!(
        support::call(&mut b4, Some(1), "withdraw", 101)
            .await
            .expect("answer")
            .status,
        "fail"
    );
    support::replicas_converge(&cluster, 100).await;
    assert_eq!(
        support::call(&mut b4, Some(2), "withdraw", 100)
            .await
            .expect("answer")
            .status,
        "success"
    );
    support::replicas_converge(&cluster, 0).await;
    let mut b1 = support::bank_client(&clients, 1);
    let reply = support::call(&mut b1, None, "query", 0).await.expect("query");
    assert_eq!((reply.status.as_str(), reply.balance), ("success", 0));
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposits_beyond_the_int32_wire_limit_fail() {
    let cluster = support::start_cluster(2, i32::MAX as u64 - 10, 3).await;
    let clients = support::clients(&cluster);
    let mut bank = support::bank_client(&clients, 2);
    assert_eq!(
        support::call(&mut bank, Some(1), "deposit", 11)
            .await
            .expect("answer")
            .status,
        "fail"
    );
    assert_eq!(
        support::call(&mut bank, Some(2), "deposit", 10)
            .await
            .expect("answer")
            .status,
        "success"
    );
    let reply = support::call(&mut bank, Some(3), "query", 0).await.expect("query");
    assert_eq!(reply.balance, i32::MAX);
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_branch_reports_serving_over_grpc_health() {
    let cluster = support::start_cluster(5, 0, 3).await;
    let clients = support::clients(&cluster);
    for branch in 1..=5 {
        let mut health = HealthClient::new(clients.channel(branch).expect("channel"));
        for service in ["", "Bank"] {
            let reply = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("branch {branch} health {service:?}: {e}"));
            assert_eq!(
                reply.into_inner().status,
                ServingStatus::Serving as i32,
                "branch {branch} {service:?}"
            );
        }
    }
    cluster.shutdown().await.expect("clean shutdown");
}

/// Server reflection (v1 and v1alpha, which older grpcurl releases use) lists the customer API
/// and health, never the peer API, and serves `Bank`'s file so a tool can call it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_customer_api_and_not_the_peer_api() {
    use prost::Message as _;
    use tonic_reflection::pb::{v1, v1alpha};

    let cluster = support::start_cluster(1, 0, 1).await;
    let clients = support::clients(&cluster);
    let channel = clients.channel(1).expect("channel");
    let ask = |request: v1::server_reflection_request::MessageRequest| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let requests = vec![
        ask(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ask(v1::server_reflection_request::MessageRequest::FileContainingSymbol(
            "Bank".into(),
        )),
        ask(v1::server_reflection_request::MessageRequest::FileContainingSymbol(
            "distbank.peer.v1.Peer".into(),
        )),
    ];
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection v1")
        .into_inner();
    let mut next = async || {
        replies
            .message()
            .await
            .expect("a reply")
            .and_then(|reply| reply.message_response)
            .expect("a response")
    };
    let v1::server_reflection_response::MessageResponse::ListServicesResponse(list) = next().await else {
        panic!("not a service list")
    };
    let services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["Bank", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(
            services.iter().any(|s| s == expected),
            "{expected} missing from {services:?}"
        );
    }
    assert!(!services.iter().any(|s| s.contains("peer")), "{services:?}");
    let v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files) = next().await else {
        panic!("no file for Bank")
    };
    let file =
        prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice()).expect("a file descriptor");
    assert_eq!(file.name(), "banks.proto");
    let methods: Vec<&str> = file.service[0].method.iter().map(|m| m.name()).collect();
    assert_eq!((file.service[0].name(), methods), ("Bank", vec!["MsgDelivery"]));
    // tonic-reflection ends the stream with NOT_FOUND for an unknown symbol.
    let refused = replies.message().await;
    assert!(
        matches!(&refused, Err(status) if status.code() == tonic::Code::NotFound),
        "the peer API is not published: {refused:?}"
    );

    let mut old = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let list = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let reply = old
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .expect("reflection v1alpha")
        .into_inner()
        .message()
        .await
        .expect("a reply");
    assert!(
        matches!(reply.and_then(|r| r.message_response), Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) if l.service.iter().any(|s| s.name == "Bank")),
        "v1alpha lists Bank"
    );
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_before_the_cluster_has_formed() {
    // Start one branch of a three-branch membership whose peers never come up: it can never
    // answer linearizably, so it must not claim to be ready.
    let (running, addr, shutdown) = start_branch_without_quorum(Duration::from_millis(300)).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_lazy();
    let mut health = HealthClient::new(channel.clone());
    let reply = health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("health answers");
    assert_eq!(reply.into_inner().status, ServingStatus::NotServing as i32);
    // A customer request fails with UNAVAILABLE (retryable), not a wrong answer.
    let mut bank = distbank::proto::bank::bank_client::BankClient::new(channel);
    let status = support::call(&mut bank, Some(1), "deposit", 5)
        .await
        .expect_err("no quorum");
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    assert!(!running.is_ready());
    shutdown.cancel();
    running.join().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_per_connection_limit_get_resource_exhausted() {
    // A branch without quorum holds every write until its request timeout, so requests pile up
    // on one connection; those past the limit must be refused at once, not queued.
    use distbank::branch::MAX_CUSTOMER_REQUESTS_PER_CONNECTION;
    let (running, addr, shutdown) = start_branch_without_quorum(Duration::from_secs(300)).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_lazy();
    let total = MAX_CUSTOMER_REQUESTS_PER_CONNECTION + 40;
    let (results, mut refused) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let mut bank = distbank::proto::bank::bank_client::BankClient::new(channel.clone());
        let results = results.clone();
        tasks.spawn(async move {
            let outcome = support::call(&mut bank, Some(i as u64 + 1), "deposit", 1).await;
            let _ = results.send(outcome.map(|_| ()).map_err(|status| status.code()));
        });
    }
    // Exactly the excess is refused, and quickly (the admitted ones wait for 300 s).
    let excess = total - MAX_CUSTOMER_REQUESTS_PER_CONNECTION;
    for n in 0..excess {
        let result = tokio::time::timeout(Duration::from_secs(60), refused.recv())
            .await
            .unwrap_or_else(|_| panic!("only {n} of {excess} excess requests were refused"))
            .expect("senders alive");
        assert_eq!(result, Err(Code::ResourceExhausted));
    }
    assert!(refused.try_recv().is_err(), "more than the excess was refused");
    shutdown.cancel();
    tasks.abort_all();
    running.join().await.expect("clean shutdown");
}

/// Branch 1 of a three-branch membership whose peers never come up: no quorum, so every write
/// waits for `request_timeout` and health never turns SERVING.
async fn start_branch_without_quorum(
    request_timeout: Duration,
) -> (
    distbank::branch::RunningBranch,
    std::net::SocketAddr,
    tokio_util::sync::CancellationToken,
) {
    use distbank::branch::{self, BranchConfig};
    let customer = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let peer = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = customer.local_addr().expect("addr");
    let config = BranchConfig {
        id: 1,
        initial_balance: 0,
        members: [
            (1, peer.local_addr().expect("addr").to_string()),
            (2, "127.0.0.1:1".into()),
            (3, "127.0.0.1:1".into()),
        ]
        .into_iter()
        .collect(),
        voters: 3,
        timing: Default::default(),
        request_timeout,
        data_dir: None,
        tls: Default::default(),
        standalone: false,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = branch::start(config, customer, peer, shutdown.clone())
        .await
        .expect("starts");
    (running, addr, shutdown)
}
