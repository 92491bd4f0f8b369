//! Bad input: `distbank run` exits with code 2, names the file, the item and the field, says
//! what was expected, and writes no output file (an existing one is left untouched).

use std::path::Path;
use std::process::Command;

const BRANCH: &str = r#"{"id": 1, "type": "branch", "balance": 100}"#;

fn customer(events: &str) -> String {
    format!(r#"[{BRANCH}, {{"id": 1, "type": "customer", "events": [{events}]}}]"#)
}

/// Runs `distbank run bad.json -o out.json` in a fresh directory; returns stderr.
fn run_rejected(input: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let input_path = dir.path().join("bad.json");
    std::fs::write(&input_path, input).expect("write input");
    let output_path = dir.path().join("out.json");
    let result = Command::new(env!("CARGO_BIN_EXE_distbank"))
        .args(["run", "bad.json", "-o", "out.json"])
        .current_dir(dir.path())
        .env("RUST_LOG", "off")
        .output()
        .expect("distbank runs");
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert_eq!(result.status.code(), Some(2), "exit code for {input}: stderr: {stderr}");
    assert!(!output_path.exists(), "an output file was written for {input}");
    assert!(stderr.contains("bad.json"), "the message names the file: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    stderr
}

fn assert_rejected(input: &str, fragments: &[&str]) {
    let stderr = run_rejected(input);
    for fragment in fragments {
        assert!(stderr.contains(fragment), "expected {fragment:?} in: {stderr}");
    }
}

#[test]
fn not_json() {
    assert_rejected("[{\"id\": 1,", &["not valid JSON", "line 1"]);
    assert_rejected("", &["not valid JSON"]);
}

#[test]
fn not_an_array() {
    assert_rejected(r#"{"id": 1}"#, &["$:", "expected an array"]);
    assert_rejected(r#"[17]"#, &["$[0]", "object"]);
}

#[test]
fn unknown_or_missing_type() {
    assert_rejected(
        r#"[{"id": 1, "type": "bank"}]"#,
        &["$[0].type", "\"branch\" or \"customer\"", "bank"],
    );
    assert_rejected(r#"[{"id": 1, "balance": 4}]"#, &["$[0]", "type"]);
}

#[test]
fn money_missing_negative_or_not_an_integer() {
    assert_rejected(
        &customer(r#"{"id": 1, "interface": "deposit"}"#),
        &["$[1].events[0]", "money", "positive integer"],
    );
    assert_rejected(
        &customer(r#"{"id": 1, "interface": "withdraw", "money": -5}"#),
        &["$[1].events[0].money", "-5"],
    );
    assert_rejected(
        &customer(r#"{"id": 1, "interface": "deposit", "money": 2.5}"#),
        &["$[1].events[0].money", "2.5"],
    );
    assert_rejected(
        &customer(r#"{"id": 1, "interface": "deposit", "money": "10"}"#),
        &["$[1].events[0].money", "10"],
    );
    assert_rejected(
        &customer(r#"{"id": 1, "interface": "deposit", "money": 0}"#),
        &["$[1].events[0].money", "positive"],
    );
}

#[test]
fn unknown_interface() {
    assert_rejected(
        &customer(r#"{"id": 1, "interface": "transfer", "money": 5}"#),
        &[
            "$[1].events[0].interface",
            "\"deposit\", \"withdraw\" or \"query\"",
            "transfer",
        ],
    );
}

#[test]
fn duplicate_branch_ids() {
    assert_rejected(
        &format!("[{BRANCH}, {BRANCH}]"),
        &["$[1]", "duplicate branch id 1", "$[0]"],
    );
}

#[test]
fn duplicate_event_ids() {
    assert_rejected(
        &format!(
            r#"[{BRANCH}, {{"id": 1, "type": "customer", "events": [{{"id": 3, "interface": "query"}}]}},
               {{"id": 1, "type": "customer", "events": [{{"id": 3, "interface": "query"}}]}}]"#
        ),
        &["$[2].events[0]", "duplicate event id 3", "$[1].events[0]"],
    );
}

#[test]
fn customer_without_a_branch() {
    assert_rejected(
        &format!(r#"[{BRANCH}, {{"id": 2, "type": "customer", "events": []}}]"#),
        &["$[1]", "customer 2", "no branch 2"],
    );
}

#[test]
fn no_branches_at_all() {
    assert_rejected(r#"[{"id": 1, "type": "customer", "events": []}]"#, &["branch"]);
}

#[test]
fn different_initial_balances() {
    assert_rejected(
        &format!(r#"[{BRANCH}, {{"id": 2, "type": "branch", "balance": 7}}]"#),
        &["$[1]", "branch 2", "7", "100", "replicas"],
    );
}

#[test]
fn amounts_and_balances_that_overflow() {
    assert_rejected(
        r#"[{"id": 1, "type": "branch", "balance": 2147483648}]"#,
        &["$[0].balance", "2147483647"],
    );
    assert_rejected(
        r#"[{"id": 1, "type": "branch", "balance": 99999999999999999999}]"#,
        &["$[0].balance"],
    );
    assert_rejected(
        &customer(r#"{"id": 1, "interface": "deposit", "money": 2147483600}"#),
        &["$[1].events[0].money", "2147483647"],
    );
    assert_rejected(
        &customer(r#"{"id": 1, "interface": "deposit", "money": 9999999999999}"#),
        &["$[1].events[0].money", "2147483647"],
    );
}

#[test]
fn bad_ids() {
    assert_rejected(r#"[{"id": -1, "type": "branch", "balance": 1}]"#, &["$[0].id"]);
    assert_rejected(r#"[{"id": "one", "type": "branch", "balance": 1}]"#, &["$[0].id"]);
    assert_rejected(&customer(r#"{"interface": "query"}"#), &["$[1].events[0]", "id"]);
}

#[test]
fn unreadable_file_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let result = Command::new(env!("CARGO_BIN_EXE_distbank"))
        .args(["run", "missing.json", "-o", "out.json"])
        .current_dir(dir.path())
        .output()
        .expect("runs");
    assert_eq!(result.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&result.stderr).contains("missing.json"));
    assert!(!dir.path().join("out.json").exists());
}

#[test]
fn an_existing_output_file_is_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("bad.json"), "[").expect("write");
    let previous = dir.path().join("out.json");
    std::fs::write(&previous, "previous run").expect("write");
    let status = Command::new(env!("CARGO_BIN_EXE_distbank"))
        .args(["run", "bad.json", "-o", "out.json"])
        .current_dir(dir.path())
        .output()
        .expect("runs")
        .status;
    assert_eq!(status.code(), Some(2));
    assert_eq!(
        std::fs::read_to_string(Path::new(&previous)).expect("read"),
        "previous run"
    );
}

#[test]
fn older_variants_are_accepted() {
    // Money on queries (older course files) is ignored; 10.0 is the integer 10.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("old.json"),
        r#"[{"id": 1, "type": "customer", "events": [{"id": 1, "interface": "query", "money": 5},
            {"id": 2, "interface": "deposit", "money": 10.0}, {"id": 3, "interface": "query"}]},
           {"id": 1, "type": "branch", "balance": 400}]"#,
    )
    .expect("write");
    let result = Command::new(env!("CARGO_BIN_EXE_distbank"))
        .args(["run", "old.json", "-o", "out.json"])
        .current_dir(dir.path())
        .output()
        .expect("runs");
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.json")).expect("output"),
        r#"[{"id": 1, "recv": [{"interface": "query", "balance": 400}, {"interface": "deposit", "result": "success"}, {"interface": "query", "balance": 410}]}]"#
    );
}

/// A directory with `in.json` (one branch, one query), for the command-line tests below.
fn query_input_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("in.json"),
        customer(r#"{"id": 1, "interface": "query"}"#),
    )
    .expect("write");
    dir
}

/// Runs `distbank ARGS` in `dir` with `RUST_LOG` set; returns the exit code and stderr.
fn distbank_in(dir: &Path, args: &[&str], rust_log: &str) -> (Option<i32>, String) {
    let result = Command::new(env!("CARGO_BIN_EXE_distbank"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", rust_log)
        .output()
        .expect("distbank runs");
    (
        result.status.code(),
        String::from_utf8_lossy(&result.stderr).into_owned(),
    )
}

/// Flags out of range are usage errors (exit 2, the flag named, no output), not a panic when
/// a deadline computed from them overflows the clock, and not a cluster that hangs.
#[test]
fn flags_out_of_range_are_refused() {
    let dir = query_input_dir();
    for (args, flag) in [
        (
            &["run", "in.json", "--request-timeout", "18446744073709551615"][..],
            "--request-timeout",
        ),
        (&["run", "in.json", "--heartbeat-ms", "0"][..], "--heartbeat-ms"),
        (
            &[
                "run",
                "in.json",
                "--heartbeat-ms",
                "1000",
                "--election-timeout-ms",
                "1000",
            ][..],
            "--election-timeout-ms",
        ),
        (&["run", "in.json", "--voters", "0"][..], "--voters"),
        (&["run", "in.json", "--snapshot-every", "0"][..], "--snapshot-every"),
        (&["run", "in.json", "--concurrency", "0"][..], "--concurrency"),
        (
            &["run", "in.json", "--retry-budget", "18446744073709551615"][..],
            "--retry-budget",
        ),
        (
            &[
                "replay",
                "in.json",
                "--branch-addr",
                "1=127.0.0.1:1",
                "--wait-timeout",
                "99999999999",
            ][..],
            "--wait-timeout",
        ),
        (&["bench", "--concurrent", "2", "--duration", "1e300"][..], "--duration"),
        (&["bench", "in.json", "--runs", "0"][..], "--runs"),
        (&["bench", "--generate", "1000000x1"][..], "--generate"),
        (
            &["replay", "in.json", "--branch-addr", "1=a:99999"][..],
            "--branch-addr",
        ),
        (
            &[
                "branch",
                "--id",
                "1",
                "--input",
                "in.json",
                "--peers",
                "1=127.0.0.1:1",
                "--tls-reload-secs",
                "99999999999",
            ][..],
            "--tls-reload-secs",
        ),
    ] {
        let mut args = args.to_vec();
        if matches!(args[0], "run" | "replay") {
            args.extend(["-o", "out.json"]);
        }
        let (code, stderr) = distbank_in(dir.path(), &args, "off");
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: the message names {flag}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!dir.path().join("out.json").exists(), "{args:?} wrote an output");
    }
}

/// A runtime failure names the path and its cause once (the causes of an error chain are not
/// repeated when a message already quotes them).
#[test]
fn a_data_dir_that_is_a_file_is_named_with_its_cause_once() {
    let dir = query_input_dir();
    std::fs::write(dir.path().join("not-a-dir"), "").expect("write");
    let branch = ["branch", "--id", "1", "--input", "in.json", "--peers", "1=127.0.0.1:1"];
    let listeners = ["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"];
    let args = [&branch[..], &listeners[..], &["--data-dir", "not-a-dir"][..]].concat();
    let (code, stderr) = distbank_in(dir.path(), &args, "off");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not-a-dir"), "{stderr}");
    assert_eq!(stderr.matches("os error").count(), 1, "the cause repeated: {stderr}");
}

/// An output that cannot be written is refused before any branch starts (exit 2), not after
/// the whole replay.
#[test]
fn an_output_that_cannot_be_written_is_refused_first() {
    let dir = query_input_dir();
    std::fs::create_dir(dir.path().join("a-dir")).expect("mkdir");
    for output in ["a-dir", "missing/out.json"] {
        let args = ["--log-format", "json", "run", "in.json", "-o", output];
        let (code, stderr) = distbank_in(dir.path(), &args, "info");
        assert_eq!(code, Some(2), "{output}: {stderr}");
        assert!(stderr.contains(output) && stderr.contains("cannot write"), "{stderr}");
        assert!(!stderr.contains("openraft"), "a branch started first: {stderr}");
    }
}
