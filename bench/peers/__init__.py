"""The process managers the benchmark drives, by name, runvisor first."""

from __future__ import annotations

from bench.peers.base import Peer
from bench.peers.circus import Circus
from bench.peers.pm2 import Pm2
from bench.peers.runvisor import Runvisor
from bench.peers.supervisord import Supervisord

PEERS: dict[str, type[Peer]] = {
    peer.name: peer for peer in (Runvisor, Supervisord, Circus, Pm2)
}
