"""The chart's alerts, run by Prometheus' own rule engine (`promtool`).

`test_chart.py` checks what the PrometheusRule *says*; these check what it *does*:
- `promtool check rules` parses every expression;
- `promtool test rules` feeds each alert the series of the failure it is meant for, and of the
  look-alikes it must ignore (another release's branches, "fail" answers, a branch that is only
  briefly unready), and checks when it fires, with which labels and rendered summary;
- a real 3-branch `distbank server`, after a replay: its `/metrics` passes `promtool check
  metrics`, has every metric and label the rules use, and, fed to the rules as it is, makes
  none of them fire (a healthy cluster raises no alert).

Run by scripts/check-chart.sh, which builds promtool from the Go module proxy and sets PROMTOOL
(and DISTBANK_BIN when a debug build exists); by hand:
    PROMTOOL=... DISTBANK_BIN=target/debug/distbank HELM=... python3 -m pytest -q tests/chart
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_chart import HEADLESS, NAMESPACE, ROOT, one, render, FULLNAME

SELECTOR = {"namespace": NAMESPACE, "job": HEADLESS}
OTHER_RELEASE = {"namespace": "other-ns", "job": "other-distbank-headless"}
# Counters that only move on faults: a healthy branch has no series of them.
FAULT_ONLY = {"distbank_pre_votes_total", "distbank_tls_reloads_total"}


def promtool() -> str:
    path = os.environ.get("PROMTOOL")
    if not path:
        pytest.fail("PROMTOOL is not set: run scripts/check-chart.sh (it builds promtool with Go)")
    return path


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory) -> Path:
    docs = render("--set", "metrics.prometheusRule.enabled=true")
    spec = one(docs, "PrometheusRule", FULLNAME)["spec"]
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], input=stdin, capture_output=True, text=True, check=False)


def series(name: str, values: str, release: dict = SELECTOR, **labels) -> dict:
    all_labels = {**release, **{k: str(v) for k, v in labels.items()}}
    text = ", ".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def alert(severity: str, summary: str, **labels) -> dict:
    return {"exp_labels": {"severity": severity, **{k: str(v) for k, v in labels.items()}},
            "exp_annotations": {"summary": summary}}


def run_unit_tests(tmp_path: Path, rules_file: Path, tests: list[dict]) -> None:
    # promtool compares every annotation: the descriptions are taken from the rules as they are.
    descriptions = {}
    for rule in yaml.safe_load(rules_file.read_text())["groups"][0]["rules"]:
        if "description" in rule.get("annotations", {}):
            descriptions[rule["alert"]] = rule["annotations"]["description"]
    for test in tests:
        for case in test["alert_rule_test"]:
            for expected in case["exp_alerts"]:
                if case["alertname"] in descriptions:
                    expected["exp_annotations"]["description"] = descriptions[case["alertname"]]
    spec = tmp_path / "alerts-test.yaml"
    spec.write_text(yaml.safe_dump({
        "rule_files": [str(rules_file)],
        "evaluation_interval": "30s",
        "tests": tests,
    }, sort_keys=False))
    proc = run_promtool("test", "rules", str(spec))
    assert proc.returncode == 0, f"promtool test rules:\n{proc.stdout}\n{proc.stderr}"


def test_every_rule_parses(rules_file):
    proc = run_promtool("check", "rules", str(rules_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 8 rules found" in proc.stdout, proc.stdout


def test_readiness_leadership_and_peers(tmp_path, rules_file):
    run_unit_tests(tmp_path, rules_file, [
        {
            "interval": "30s",
            "input_series": [
                # Branch 2 NOT_SERVING for good, branch 3 only for a minute (a restart).
                series("distbank_ready", "1 0x20", branch=2),
                series("distbank_ready", "0 0 1x20", branch=3),
                series("distbank_ready", "0x20", release=OTHER_RELEASE, branch=2),
                # Branch 1 stops reaching branch 3 for good; branch 2 reaches it again at once.
                series("distbank_peer_up", "1 0x20", branch=1, peer=3),
                series("distbank_peer_up", "0 1x20", branch=2, peer=3),
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "DistbankBranchNotReady", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "DistbankBranchNotReady", "exp_alerts": [
                    alert("warning", "Branch 2 cannot answer its customers", branch=2, **SELECTOR)]},
                {"eval_time": "2m", "alertname": "DistbankPeerUnreachable", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "DistbankPeerUnreachable", "exp_alerts": [
                    alert("warning", "Branch 1 cannot reach branch 3", branch=1, peer=3, **SELECTOR)]},
            ],
        },
        {
            "interval": "10s",
            "input_series": [
                # An election (4 s here) is no alert; no leader for 40 s is.
                series("distbank_raft_is_leader", "1 0 1 1 1 1 1 1 0 0 0 0 0 0 0 0", branch=1),
                series("distbank_raft_is_leader", "0x15", branch=2),
                series("distbank_raft_is_leader", "0x15", branch=3),
                series("distbank_raft_is_leader", "1x15", release=OTHER_RELEASE, branch=1),
            ],
            "alert_rule_test": [
                {"eval_time": "50s", "alertname": "DistbankNoLeader", "exp_alerts": []},
                {"eval_time": "100s", "alertname": "DistbankNoLeader", "exp_alerts": []},
                {"eval_time": "120s", "alertname": "DistbankNoLeader", "exp_alerts": [
                    alert("critical", "No branch leads: no write or read can complete")]},
            ],
        },
    ])


def test_errors_pre_votes_lag_and_certificates(tmp_path, rules_file):
    run_unit_tests(tmp_path, rules_file, [
        {
            "interval": "1m",
            "input_series": [
                # Branch 1's customers get UNAVAILABLE; branch 2's get "fail" for overdrawing,
                # which is an answer, not an error.
                series("distbank_operations_total", "0+3x30", branch=1, operation="deposit", result="unavailable"),
                series("distbank_operations_total", "0+100x30", branch=1, operation="deposit", result="success"),
                series("distbank_operations_total", "0+50x30", branch=2, operation="withdraw", result="fail"),
                series("distbank_operations_total", "0+9x30", release=OTHER_RELEASE, branch=3,
                       operation="query", result="error"),
                # Voter 3 loses a pre-vote a minute; voter 2 lost one, once.
                series("distbank_pre_votes_total", "0+1x30", branch=3, result="lost"),
                series("distbank_pre_votes_total", "0 1x30", branch=2, result="lost"),
                # Branch 5 falls behind the leader and stays there; branch 4 catches up.
                series("distbank_raft_replication_lag_entries", "0 5000x30", branch=1, peer=5),
                series("distbank_raft_replication_lag_entries", "5000 5000 0x30", branch=1, peer=4),
                # Branch 2 cannot use its renewed customer certificates.
                series("distbank_tls_reloads_total", "0 0 1x30", branch=2, tls="customer", result="failed"),
                series("distbank_tls_reloads_total", "0+1x30", branch=1, tls="peer", result="reloaded"),
            ],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "DistbankOperationsFailing", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "DistbankOperationsFailing", "exp_alerts": [
                    alert("warning", "Customers of branch 1 get errors", branch=1)]},
                {"eval_time": "10m", "alertname": "DistbankVoterCutOff", "exp_alerts": [
                    alert("warning", "Branch 3 keeps losing pre-votes: it cannot reach the leader",
                          branch=3, result="lost", **SELECTOR)]},
                {"eval_time": "4m", "alertname": "DistbankReplicaBehind", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "DistbankReplicaBehind", "exp_alerts": [
                    alert("warning", "Branch 5 is more than 1000 entries behind the leader",
                          branch=1, peer=5, **SELECTOR)]},
                {"eval_time": "5m", "alertname": "DistbankTlsReloadFailing", "exp_alerts": [
                    alert("warning", "Branch 2 refuses its renewed customer TLS certificates",
                          branch=2, tls="customer", result="failed", **SELECTOR)]},
            ],
        },
    ])


def histogram(per_minute: dict[str, int], branch: int) -> list[dict]:
    """Cumulative buckets growing by `per_minute[le]` observations a minute."""
    return [series("distbank_operation_duration_seconds_bucket", f"0+{n}x40", branch=branch,
                   operation="deposit", le=le) for le, n in per_minute.items()]


def test_slow_operations(tmp_path, rules_file):
    # 100 operations a minute; fast: all within 5 ms; slow: 5 of them take over 0.25 s.
    fast = {"0.005": 100, "0.1": 100, "0.25": 100, "+Inf": 100}
    slow = {"0.005": 80, "0.1": 90, "0.25": 95, "+Inf": 100}
    run_unit_tests(tmp_path, rules_file, [
        {"interval": "1m", "input_series": histogram(fast, branch=1),
         "alert_rule_test": [{"eval_time": "30m", "alertname": "DistbankSlowOperations", "exp_alerts": []}]},
        {"interval": "1m", "input_series": histogram(slow, branch=1),
         "alert_rule_test": [
             {"eval_time": "9m", "alertname": "DistbankSlowOperations", "exp_alerts": []},
             {"eval_time": "20m", "alertname": "DistbankSlowOperations", "exp_alerts": [
                 alert("warning", "p99 of customer operations above 0.1 s for 10 minutes")]},
         ]},
    ])


# --- a real branch's /metrics -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_base_port() -> int:
    """A base port whose branch ports (base+1..base+3) are free now, below the ephemeral range
    (where the branches' own peer listeners could take one first)."""
    for _ in range(50):
        base = random.randrange(20000, 32000)
        try:
            for port in range(base + 1, base + 4):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    pytest.fail("no free ports for three branches")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as reply:
        return reply.read().decode()


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory) -> str:
    """/metrics of a 3-branch `distbank server` after one replay of the example input."""
    binary = os.environ.get("DISTBANK_BIN")
    if not binary:
        pytest.fail("DISTBANK_BIN is not set: scripts/check-chart.sh sets it to the debug build")
    binary = str(Path(binary).resolve())
    work = tmp_path_factory.mktemp("live")
    base, metrics_port = free_base_port(), free_port()
    example = ROOT / "examples" / "input.json"
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [binary, "--metrics-listen", f"127.0.0.1:{metrics_port}", "server", str(example), "--base-port", str(base)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (work / "server.log").read_text()
            try:
                text = scrape(url)
                if len(re.findall(r"^distbank_ready\{[^}]*\} 1$", text, re.M)) == 3:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the branches did not all become ready in 60 s"
            time.sleep(0.1)
        replay = subprocess.run([binary, "client", str(example), "--base-port", str(base)],
                                cwd=work, capture_output=True, text=True, timeout=120, check=False)
        assert replay.returncode == 0, replay.stderr
        return scrape(url)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def rule_metrics(rules_file: Path) -> dict[str, set[str]]:
    """Each metric the rules use, with the label names they select, group or print."""
    used: dict[str, set[str]] = {}
    for rule in yaml.safe_load(rules_file.read_text())["groups"][0]["rules"]:
        printed = set(re.findall(r"\$labels\.(\w+)", " ".join(rule.get("annotations", {}).values())))
        grouped = {l.strip() for g in re.findall(r"by \(([^)]*)\)", rule["expr"]) for l in g.split(",")}
        for name, selector in re.findall(r"(distbank_\w+)(\{[^}]*\})?", rule["expr"]):
            selected = set(re.findall(r"(\w+)\s*=~?", selector)) - set(SELECTOR)
            used.setdefault(name, set()).update(selected | grouped | printed)
    return used


def test_a_real_branch_exposes_what_the_rules_use(live_metrics, rules_file):
    # promtool lints the Prometheus text format; a branch serves OpenMetrics, whose counter
    # families are named without `_total` (`# HELP distbank_operations ...`), so the classic
    # parser finds no help for `distbank_operations_total`. Every other finding counts.
    lint = run_promtool("check", "metrics", stdin=live_metrics)
    helped = set(re.findall(r"^# HELP (\w+) ", live_metrics, re.M))

    def excused(finding: str) -> bool:
        counter = re.fullmatch(r"(\w+)_total no help text", finding)
        return bool(counter) and counter.group(1) in helped

    findings = [f for f in (lint.stdout + lint.stderr).splitlines() if f.strip() and not excused(f)]
    assert not findings, "\n".join(findings)
    assert lint.returncode in (0, 3), lint.stderr  # 3: lint findings (all excused above)
    families = set(re.findall(r"^# TYPE (\w+) ", live_metrics, re.M))
    for name, labels in rule_metrics(rules_file).items():
        if name in FAULT_ONLY:
            # No series until a fault: src/metrics.rs, fault_counters_are_named_as_the_alerts_expect.
            assert name not in live_metrics, f"{name} moved on a healthy cluster"
            continue
        family = re.sub(r"_(total|bucket)$", "", name)
        assert family in families, f"{name}: no such metric on a branch"
        samples = re.findall(rf"^{name}\{{([^}}]*)\}}", live_metrics, re.M)
        assert samples, f"{name}: no series on a branch"
        present = set(re.findall(r'(\w+)="', samples[0]))
        assert labels <= present, f"{name} has labels {present}, the rules use {labels}"


def test_a_healthy_cluster_raises_no_alert(tmp_path, live_metrics, rules_file):
    # The scrape, held steady for 30 minutes as a Prometheus with this release's target labels
    # would store it.
    inputs = []
    for line in live_metrics.splitlines():
        m = re.match(r"^(distbank_\w+)\{([^}]*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            inputs.append(series(m.group(1), f"{m.group(3)}x60", **labels))
    assert any(i["series"].startswith("distbank_operations_total") for i in inputs)
    alerts = [r["alert"] for r in yaml.safe_load(rules_file.read_text())["groups"][0]["rules"]]
    run_unit_tests(tmp_path, rules_file, [{
        "interval": "30s",
        "input_series": inputs,
        "alert_rule_test": [{"eval_time": "30m", "alertname": a, "exp_alerts": []} for a in alerts],
    }])
