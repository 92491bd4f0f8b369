//! Property: any workload (many branches, the same customer id in several items, overdrawing
//! withdrawals, events listed out of id order) replayed one customer after another through a
//! real cluster gives exactly what a simple sequential model of one balance predicts, and
//! every replica ends at the model's balance.

mod support;

use std::time::Duration;

use distbank::replay::{self, ReplayOptions};
use distbank::{input, output};
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Ev {
    Deposit(u64),
    Withdraw(u64),
    Query,
}

fn event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        (1u64..300).prop_map(Ev::Deposit),
        (1u64..600).prop_map(Ev::Withdraw),
        Just(Ev::Query),
    ]
}

/// (branches, initial balance, customer items: (customer id, events))
fn workload() -> impl Strategy<Value = (u64, u64, Vec<(u64, Vec<Ev>)>)> {
    (1u64..=9, 0u64..500).prop_flat_map(|(branches, initial)| {
        let item = (1..=branches, prop::collection::vec(event(), 1..5));
        (Just(branches), Just(initial), prop::collection::vec(item, 1..10))
    })
}

/// The sequential model: customers in input order, each customer's events in id order.
fn model(initial: u64, items: &[(u64, Vec<(u64, Ev)>)]) -> (String, u64) {
    let mut balance = initial;
    let mut outputs = Vec::new();
    for (customer, events) in items {
        let mut sorted = events.clone();
        sorted.sort_by_key(|(id, _)| *id);
        let recv = sorted
            .iter()
            .map(|(_, ev)| match ev {
                Ev::Deposit(a) => {
                    balance += a;
                    output::Recv::Deposit { success: true }
                }
                Ev::Withdraw(a) if *a <= balance => {
                    balance -= a;
                    output::Recv::Withdraw { success: true }
                }
                Ev::Withdraw(_) => output::Recv::Withdraw { success: false },
                Ev::Query => output::Recv::Query { balance },
            })
            .collect();
        outputs.push(output::CustomerOutput { id: *customer, recv });
    }
    (output::render(&outputs), balance)
}

/// Gives every event a unique id, in reverse order within each item (the replay must sort).
fn with_ids(items: &[(u64, Vec<Ev>)]) -> Vec<(u64, Vec<(u64, Ev)>)> {
    let mut next = 1000;
    items
        .iter()
        .map(|(customer, events)| {
            let ids: Vec<u64> = (0..events.len() as u64).map(|i| next + i).rev().collect();
            next += events.len() as u64;
            (*customer, ids.into_iter().zip(events.iter().cloned()).collect())
        })
        .collect()
}

fn input_json(branches: u64, initial: u64, items: &[(u64, Vec<(u64, Ev)>)]) -> String {
    let mut array: Vec<serde_json::Value> = items
        .iter()
        .map(|(customer, events)| {
            let events: Vec<serde_json::Value> = events
                .iter()
                .map(|(id, ev)| match ev {
                    Ev::Deposit(a) => json!({"id": id, "interface": "deposit", "money": a}),
                    Ev::Withdraw(a) => json!({"id": id, "interface": "withdraw", "money": a}),
                    Ev::Query => json!({"id": id, "interface": "query"}),
                })
                .collect();
            json!({"id": customer, "type": "customer", "events": events})
        })
        .collect();
    array.extend((1..=branches).map(|id| json!({"id": id, "type": "branch", "balance": initial})));
    serde_json::Value::Array(array).to_string()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn replay_equals_sequential_model((branches, initial, items) in workload()) {
        let items = with_ids(&items);
        let text = input_json(branches, initial, &items);
        let parsed = input::parse(&text, "generated.json").expect("generated input is valid");
        let (expected, final_balance) = model(initial, &items);
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let actual = runtime.block_on(async {
            let cluster = support::start_cluster(branches, initial, 3).await;
            let clients = support::clients(&cluster);
            replay::wait_until_serving(&clients, Duration::from_secs(30)).await.expect("serving");
            let outputs = replay::replay(&parsed, &clients, &ReplayOptions::default()).await.expect("replay");
            support::replicas_converge(&cluster, final_balance).await;
            cluster.shutdown().await.expect("clean shutdown");
            output::render(&outputs)
        });
        prop_assert_eq!(actual, expected);
    }
}
