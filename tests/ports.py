"""Ports for servers that a test starts as a separate process with an explicit HOST:PORT.

Binding port 0 and passing the number on is a race: until the child binds it, the kernel
may hand the same port to any other socket that binds port 0 or connects out, and with
pytest-xdist another worker is always doing that (seen in CI: `pgbosh dev: dns: cannot
listen on 127.0.0.1:49556: address already in use`). The kernel only hands out ports in
net.ipv4.ip_local_port_range, so these come from below it, chosen at random and checked.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free now and that the kernel never assigns on its own."""
    high = min(_ephemeral_low(), 65536)
    low = max(1024, high - 12000)
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {low}-{high - 1} on {host}")
