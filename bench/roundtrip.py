"""Time status round trips to a running daemon from inside one client process.

Usage: `python roundtrip.py PEER ENDPOINT COUNT`. Prints a JSON list of the
duration of each round trip in seconds. It runs under the Python that has
the peer's own client library (the bench venv for circus, the project venv
for runvisor), so it imports only the standard library at the top.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from typing import Any


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixHTTPConnection(self.path)


class UnixServerProxy(xmlrpc.client.ServerProxy):
    """An XML-RPC proxy that talks HTTP over a Unix socket (supervisord's)."""

    def __init__(self, path: str) -> None:
        super().__init__("http://localhost/RPC2", transport=_UnixTransport(path))


def _supervisord(endpoint: str) -> Callable[[], object]:
    proxy = UnixServerProxy(endpoint)
    return lambda: proxy.supervisor.getAllProcessInfo()


def _circus(endpoint: str) -> Callable[[], object]:
    from circus.client import CircusClient

    client = CircusClient(endpoint=endpoint, timeout=10)

    def status() -> object:
        return client.call({"command": "status", "properties": {}})

    return status


def _runvisor(endpoint: str) -> Callable[[], object]:
    from pathlib import Path

    from supervisor.control import Client
    from supervisor.protocol import StatusRequest

    client = Client.connect(Path(endpoint))

    def status() -> object:
        return client.request(StatusRequest())

    return status


CLIENTS = {"supervisord": _supervisord, "circus": _circus, "runvisor": _runvisor}


def main() -> None:
    peer, endpoint, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    call = CLIENTS[peer](endpoint)
    call()  # connect and warm up outside the timed loop
    durations = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        durations.append(time.perf_counter() - start)
    json.dump(durations, sys.stdout)


if __name__ == "__main__":
    main()
