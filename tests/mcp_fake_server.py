"""A tiny, misbehaving-on-request MCP stdio server for the T-PRO-2 tests (stdlib only).

Newline-delimited JSON-RPC 2.0 on stdin/stdout. Tools:
  echo      -> text = JSON of the arguments
  big       -> text = "x" * arguments["n"]
  hang      -> never answers (sleeps forever)
  huge      -> answers one 50 MB line, written in 1 MiB pieces
  die       -> exits without answering (server death mid-call)
  garbage   -> writes a line that is not JSON
  no_result -> a response with neither result nor error
  rpc_error -> a JSON-RPC error object
  chatty    -> a notification and a ping request first, then the answer
  pid       -> text = its process id
  env       -> text = JSON list of its environment variable names
Env FAKE_MCP_VERSION overrides the protocolVersion it answers initialize with.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

OUT = sys.stdout.buffer


def send(msg: dict[str, Any]) -> None:
    OUT.write(json.dumps(msg).encode() + b"\n")
    OUT.flush()


def text(msg_id: Any, value: str) -> None:
    send({"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": value}], "isError": False}})


def call(msg_id: Any, name: str, args: dict[str, Any]) -> None:
    if name == "echo":
        text(msg_id, json.dumps(args, sort_keys=True))
    elif name == "big":
        text(msg_id, "x" * int(args.get("n", 0)))
    elif name == "hang":
        while True:
            time.sleep(3600)
    elif name == "huge":
        head = json.dumps({"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": "@"}]}})
        before, after = head.split("@")
        OUT.write(before.encode())
        piece = b"A" * (1 << 20)
        for _ in range(50):
            OUT.write(piece)
        OUT.write(after.encode() + b"\n")
        OUT.flush()
    elif name == "die":
        os._exit(3)
    elif name == "garbage":
        OUT.write(b"this is not json\n")
        OUT.flush()
    elif name == "no_result":
        send({"jsonrpc": "2.0", "id": msg_id})
    elif name == "rpc_error":
        send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32000, "message": "tool exploded"}})
    elif name == "chatty":
        send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hi"}})
        send({"jsonrpc": "2.0", "id": "srv-1", "method": "ping"})
        reply = json.loads(sys.stdin.buffer.readline())
        send({"jsonrpc": "2.0", "id": "srv-2", "method": "roots/list"})
        refused = json.loads(sys.stdin.buffer.readline())
        text(msg_id, json.dumps({"ping": reply.get("result"), "roots": refused.get("error", {}).get("code")}))
    elif name == "pid":
        text(msg_id, str(os.getpid()))
    elif name == "env":
        text(msg_id, json.dumps(sorted(os.environ)))
    else:
        send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32602, "message": "unknown tool"}})


def main() -> None:
    for raw in sys.stdin.buffer:
        msg = json.loads(raw)
        method, msg_id = msg.get("method"), msg.get("id")
        if method == "initialize":
            version = os.environ.get("FAKE_MCP_VERSION", msg["params"]["protocolVersion"])
            send({"jsonrpc": "2.0", "id": msg_id, "result": {
                "protocolVersion": version, "capabilities": {"tools": {}},
                "serverInfo": {"name": "fake", "version": "0"}}})
        elif method == "notifications/initialized":
            continue
        elif method == "tools/call":
            call(msg_id, msg["params"]["name"], msg["params"].get("arguments", {}))
        elif msg_id is not None:
            send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32601, "message": "no such method"}})


if __name__ == "__main__":
    main()
