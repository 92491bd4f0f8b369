#!/usr/bin/env python3
"""How long writes pause when the leader stops: a rolling restart's cost, measured.

    leader_stop.py [--signal TERM|KILL] [--rounds N] [--voters N] [--distbank BIN]

Starts `distbank branch` processes on loopback (three voters unless --voters says otherwise,
and one non-voting replica; data directories, default timing), and one customer that deposits on the replica without
pause. Each round waits until the leader has led for 5 s, sends it the signal (TERM: a
clean stop, with the leadership hand-off; KILL: a crash), restarts it once it has exited,
and waits until it is SERVING again. Prints, per round, the longest gap between two
acknowledged deposits around the stop, and how long the stopped branch took to exit.

Needs Python with grpcio and grpcio-tools (scripts/test.sh makes such a virtualenv in
~/.cache/distbank/venv) and a built distbank (default: target/release/distbank).
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port, series):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    match = re.search(r"^" + re.escape(series) + r" (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


class Branch:
    def __init__(self, binary, work, branch_id, ports, peers, voters):
        self.binary, self.id, self.ports = binary, branch_id, ports
        self.args = [
            binary, "--log-format", "text", "branch", "--id", str(branch_id),
            "--input", os.path.join(work, "input.json"),
            "--listen", f"127.0.0.1:{ports['customer']}",
            "--peer-listen", f"127.0.0.1:{ports['peer']}",
            "--metrics-listen", f"127.0.0.1:{ports['metrics']}",
            "--peers", peers, "--data-dir", os.path.join(work, f"data-{branch_id}"),
            "--voters", str(voters),
        ]
        self.log = open(os.path.join(work, f"branch-{branch_id}.log"), "ab")
        self.process = None

    def start(self):
        env = dict(os.environ, RUST_LOG="distbank=info,openraft=error")
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=self.log, env=env)

    def metric(self, name):
        return scrape(self.ports["metrics"], f'{name}{{branch="{self.id}"}}')

    def serving(self):
        return self.metric("distbank_ready") == 1.0


def wait(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    sys.exit(f"leader_stop: timed out waiting for {what}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--signal", choices=["TERM", "KILL"], default="TERM")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--voters", type=int, default=3)
    parser.add_argument("--distbank", default=os.path.join(ROOT, "target/release/distbank"))
    args = parser.parse_args()
    branch_count = args.voters + 1

    work = tempfile.mkdtemp(prefix="distbank-leader-stop.")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}/proto", f"--python_out={work}",
         f"--grpc_python_out={work}", "banks.proto"],
        check=True,
    )
    sys.path.insert(0, work)
    import grpc
    import banks_pb2
    import banks_pb2_grpc

    with open(os.path.join(work, "input.json"), "w") as f:
        json.dump([{"id": i, "type": "branch", "balance": 0} for i in range(1, branch_count + 1)], f)
    ports = {i: {k: free_port() for k in ("customer", "peer", "metrics")} for i in range(1, branch_count + 1)}
    peers = ",".join(f"{i}=127.0.0.1:{p['peer']}" for i, p in ports.items())
    branches = {i: Branch(args.distbank, work, i, ports[i], peers, args.voters) for i in ports}
    for branch in branches.values():
        branch.start()
    try:
        wait(lambda: all(b.serving() for b in branches.values()), "every branch SERVING")
        replica = branches[branch_count]
        channel = grpc.insecure_channel(f"127.0.0.1:{replica.ports['customer']}")
        stub = banks_pb2_grpc.BankStub(channel)
        acks, errors, stop = [], [], threading.Event()

        def customer():
            while not stop.is_set():
                try:
                    stub.MsgDelivery(
                        banks_pb2.TransactionRequest(customer_id=branch_count, operation="deposit", amount=1),
                        timeout=30,
                    )
                    acks.append(time.monotonic())
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")

        writer = threading.Thread(target=customer)
        writer.start()
        gaps = []
        for round_ in range(1, args.rounds + 1):
            leader = int(replica.metric("distbank_raft_leader") or 0)
            wait(lambda: leader and branches[leader].metric("distbank_raft_is_leader") == 1.0, "a leader")
            # Led for 5 s: longer than the lease, as a leader usually has.
            time.sleep(5)
            before = len(acks)
            stopped = time.monotonic()
            os.kill(branches[leader].process.pid, getattr(signal, "SIG" + args.signal))
            exit_code = branches[leader].process.wait(timeout=60)
            exited = time.monotonic() - stopped
            wait(lambda: len(acks) > before + 100, "deposits after the stop")
            window = [stopped] + acks[before:]
            gap = max(b - a for a, b in zip(window, window[1:]))
            gaps.append(gap)
            print(f"round {round_}: SIG{args.signal} to leader {leader} (exit {exit_code} after "
                  f"{exited * 1e3:.0f} ms): longest write gap {gap * 1e3:.0f} ms", flush=True)
            branches[leader].start()
            wait(lambda: branches[leader].serving(), f"branch {leader} SERVING again")
        stop.set()
        writer.join()
        print(f"SIG{args.signal}: {len(acks)} deposits acknowledged, {len(errors)} errors; "
              f"write gaps {', '.join(f'{g * 1e3:.0f}' for g in gaps)} ms")
        for error in errors[:5]:
            print(f"  error: {error}")
    finally:
        for branch in branches.values():
            if branch.process and branch.process.poll() is None:
                branch.process.kill()
                branch.process.wait()


if __name__ == "__main__":
    main()
