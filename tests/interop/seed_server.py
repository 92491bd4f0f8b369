"""A small bank server generated from proto/banks.proto with grpcio-tools, independent of
distbank: every branch of INPUT on HOST:(BASE_PORT+N) in one process, sharing one balance
under a lock (so it is trivially consistent). Prints READY when all ports listen; stops on
SIGTERM/SIGINT.

usage: seed_server.py GEN_DIR INPUT HOST BASE_PORT
"""
import json
import signal
import sys
import threading
from concurrent import futures

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import banks_pb2  # noqa: E402
import banks_pb2_grpc  # noqa: E402


class Bank(banks_pb2_grpc.BankServicer):
    def __init__(self, balance):
        self.balance = balance
        self.lock = threading.Lock()

    def MsgDelivery(self, request, context):
        with self.lock:
            if request.operation == "deposit":
                self.balance += request.amount
                return banks_pb2.TransactionResponse(status="success")
            if request.operation == "withdraw":
                if request.amount <= self.balance:
                    self.balance -= request.amount
                    return banks_pb2.TransactionResponse(status="success")
                return banks_pb2.TransactionResponse(status="fail")
            if request.operation == "query":
                return banks_pb2.TransactionResponse(status="success", balance=self.balance)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown operation {request.operation!r}")


def main():
    _, _, input_path, host, base_port = sys.argv
    with open(input_path) as f:
        items = json.load(f)
    branches = [item for item in items if item["type"] == "branch"]
    bank = Bank(branches[0]["balance"])
    servers = []
    for branch in branches:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        banks_pb2_grpc.add_BankServicer_to_server(bank, server)
        port = int(base_port) + branch["id"]
        if server.add_insecure_port(f"{host}:{port}") != port:
            raise SystemExit(f"cannot listen on {host}:{port}")
        server.start()
        servers.append(server)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("READY", flush=True)
    stop.wait()
    for server in servers:
        server.stop(grace=1)


if __name__ == "__main__":
    main()
