//! The course's real inputs replayed through a real in-process cluster give exactly the
//! course's reference outputs (byte for byte, as Python's json.dump writes them).
//! Fixtures: copies of ../shared/anchors/cse531 (see tests/fixtures/README.md).

mod support;

use std::time::Duration;

use distbank::replay::{self, ReplayOptions};
use distbank::{input, output};

async fn replay_fixture(input_name: &str, voters: usize) -> (String, u64) {
    let input = input::load(&support::fixture(input_name)).expect("fixture parses");
    let cluster = support::start_cluster(input.branch_ids().len() as u64, input.initial_balance(), voters).await;
    let clients = support::clients(&cluster);
    replay::wait_until_serving(&clients, Duration::from_secs(300))
        .await
        .expect("serving");
    let outputs = replay::replay(&input, &clients, &ReplayOptions::default())
        .await
        .expect("replay");
    let rendered = output::render(&outputs);
    let final_balance = match outputs.last().and_then(|c| c.recv.last()) {
        Some(output::Recv::Query { balance }) => *balance,
        other => panic!("last answer is not a query: {other:?}"),
    };
    support::replicas_converge(&cluster, final_balance).await;
    cluster.shutdown().await.expect("clean shutdown");
    (rendered, final_balance)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_example_three_customers() {
    let (output, balance) = replay_fixture("spec_3_input.json", 3).await;
    assert_eq!(
        output,
        r#"[{"id": 1, "recv": [{"interface": "query", "balance": 400}]}, {"id": 2, "recv": [{"interface": "deposit", "result": "success"}, {"interface": "query", "balance": 570}]}, {"id": 3, "recv": [{"interface": "withdraw", "result": "success"}, {"interface": "query", "balance": 500}]}]"#
    );
    assert_eq!(balance, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn course_two_round_50_branches_matches_reference_output() {
    let (output, balance) = replay_fixture("course_50_input.json", 3).await;
    assert_eq!(output, support::fixture_text("course_50_output.json"));
    assert_eq!(balance, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn course_100_branches_matches_reference_output() {
    let (output, _) = replay_fixture("course_100_input.json", 5).await;
    assert_eq!(output, support::fixture_text("course_100_output.json"));
}
