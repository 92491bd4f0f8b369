//! Arbitrary customer requests over real gRPC against a real (single-branch) distbank: no
//! panic, only the documented status codes, and a refused request changes nothing.
#![no_main]

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use distbank::cluster::LocalCluster;
use distbank::proto::bank::TransactionRequest;
use distbank::proto::bank::bank_client::BankClient;
use libfuzzer_sys::fuzz_target;
use tonic::Code;
use tonic::transport::Channel;

#[derive(Arbitrary, Debug)]
struct Request {
    customer_id: i32,
    operation: Op,
    amount: i32,
    event_id: Option<EventId>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Known(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum EventId {
    Number(u64),
    Text(String),
}

const KNOWN: [&str; 5] = [
    "deposit",
    "withdraw",
    "query",
    "propagate_deposit",
    "propagate_withdraw",
];

struct Target {
    runtime: tokio::runtime::Runtime,
    cluster: LocalCluster,
    client: BankClient<Channel>,
    /// Event ids accepted so far, with the status they were answered with.
    used_ids: Mutex<HashMap<u64, String>>,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let (runtime, cluster) = common::single_branch(0);
        let addr = cluster.customer_addrs()[&1];
        let client = runtime
            .block_on(BankClient::connect(format!("http://{addr}")))
            .expect("connects");
        Target {
            runtime,
            cluster,
            client,
            used_ids: Mutex::default(),
        }
    })
}

fuzz_target!(|request: Request| {
    let target = target();
    let operation = match &request.operation {
        Op::Known(i) => KNOWN[usize::from(*i) % KNOWN.len()].to_string(),
        Op::Other(text) => text.clone(),
    };
    let mut call = tonic::Request::new(TransactionRequest {
        customer_id: request.customer_id,
        operation: operation.clone(),
        amount: request.amount,
    });
    let mut event_id = None;
    if let Some(id) = &request.event_id {
        let text = match id {
            EventId::Number(n) => n.to_string(),
            EventId::Text(t) => t.clone(),
        };
        let Ok(value) = text.parse() else {
            return; // not a valid header value: the client could not send it at all
        };
        call.metadata_mut().insert(distbank::proto::EVENT_ID_METADATA, value);
        event_id = text.trim().parse::<u64>().ok();
    }
    // A reused event id is answered from the record (same status) or refused; never re-applied.
    let mut used = target.used_ids.lock().unwrap_or_else(|p| p.into_inner());
    let earlier = event_id.and_then(|id| used.get(&id).cloned());
    let before = target.cluster.local_balances()[&1];
    let mut client = target.client.clone();
    let reply = target.runtime.block_on(client.msg_delivery(call));
    let after = target.cluster.local_balances()[&1];
    match reply {
        Ok(reply) if earlier.is_some() => {
            assert_eq!(after, before, "a reused event id changed the balance: {request:?}");
            assert_eq!(
                Some(reply.into_inner().status),
                earlier,
                "a reused event id got another answer"
            );
        }
        Ok(reply) => {
            let reply = reply.into_inner();
            if let Some(id) = event_id {
                used.insert(id, reply.status.clone());
            }
            let amount = u64::try_from(request.amount).unwrap_or(0);
            match (operation.as_str(), reply.status.as_str()) {
                ("deposit", "success") => assert_eq!(after, before + amount),
                ("withdraw", "success") => assert_eq!(after + amount, before),
                ("withdraw", "fail") | ("deposit", "fail") | ("query", "success") => assert_eq!(after, before),
                other => panic!("unexpected reply {other:?} for {request:?}"),
            }
        }
        Err(status) => {
            assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument | Code::PermissionDenied | Code::AlreadyExists | Code::ResourceExhausted
                ),
                "unexpected status {status:?} for {request:?}"
            );
            assert_eq!(after, before, "a refused request changed the balance: {request:?}");
        }
    }
});
