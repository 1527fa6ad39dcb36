"""Throughput through HAProxy with 1 and with 3 nodes on this machine (docs/cluster.md).

    SYNAPSE_MODULE_CACHE=... python -m tests.bench_cluster [--seconds 15] [--clients 6]

Two loads: one-shot runs (POST /v1/execute, balanced leastconn) and runs in
persistent cells (POST /v1/cells/<id>/exec, routed to the owning node). Each
node has one worker, as in the end-to-end test. On a 2-core machine three
nodes cannot beat one: the cores, not the nodes, are the limit.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from tests.appliance.test_cluster_e2e import Cluster, http


def load(url_of: "list[str]", key: str, body: dict[str, str], clients: int, seconds: float) -> tuple[int, int]:
    done, failed = [0], [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        url = url_of[i % len(url_of)]
        while time.monotonic() < stop:
            status, _ = http("POST", url, body, key=key)
            with lock:
                (done if status == 200 else failed)[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0], failed[0]


def bench(names: tuple[str, ...], clients: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="cell-bench-cluster-") as tmp:
        c = Cluster(Path(tmp), names)
        try:
            c.start()
            added = c.cell(names[0], "tenant", "add", "bench")
            key = added.stdout.strip().rsplit(" ", 1)[-1]
            time.sleep(1.5)  # bench only: let every node copy the key
            cells = []
            for _ in range(clients):
                status, body = http("POST", c.front + "/v1/cells", {"template": "python3"}, key=key)
                assert status == 201, body
                cells.append(f"{c.front}/v1/cells/{body['cell_id']}/exec")
            code = {"code": "sum(range(1000))"}
            load(cells, key, code, clients, 2)  # warm-up
            ok, bad = load(cells, key, code, clients, seconds)
            print(f"{len(names)} node(s), {clients} clients, cell exec: {ok / seconds:.1f} runs/s ({bad} failed)")
            ok, bad = load([c.front + "/v1/execute"], key, {"template": "python3", **code}, clients, seconds)
            print(f"{len(names)} node(s), {clients} clients, one-shot execute: {ok / seconds:.1f} runs/s ({bad} failed)")
        finally:
            c.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
    for names in (("n1",), ("n1", "n2", "n3")):
        bench(names, args.clients, args.seconds)


if __name__ == "__main__":
    main()
