"""A customer client in the style of the original course implementation, generated from
proto/banks.proto with grpcio-tools: it knows nothing about distbank (no event ids).

usage: seed_client.py GEN_DIR INPUT HOST BASE_PORT OUTPUT
Customer N talks to HOST:(BASE_PORT+N); customers one after another, events in id order;
writes the course-format output with json.dump.
"""
import json
import sys

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import banks_pb2  # noqa: E402
import banks_pb2_grpc  # noqa: E402


def main():
    _, _, input_path, host, base_port, output_path = sys.argv
    with open(input_path) as f:
        items = json.load(f)
    output = []
    for item in items:
        if item["type"] != "customer":
            continue
        channel = grpc.insecure_channel(f"{host}:{int(base_port) + item['id']}")
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = banks_pb2_grpc.BankStub(channel)
        recv = []
        for event in sorted(item["events"], key=lambda e: e["id"]):
            op = event["interface"]
            request = banks_pb2.TransactionRequest(customer_id=item["id"], operation=op, amount=event.get("money", 0) if op != "query" else 0)
            response = stub.MsgDelivery(request, timeout=30)
            if op == "query":
                recv.append({"interface": op, "balance": response.balance})
            else:
                recv.append({"interface": op, "result": response.status})
        output.append({"id": item["id"], "recv": recv})
        channel.close()
    with open(output_path, "w") as f:
        json.dump(output, f)


if __name__ == "__main__":
    main()
