"""A free TCP port for a server that Ray will start a moment later.

Why not port 0: the kernel hands out ports from its ephemeral range (32768-60999 here), and a
Ray stack starts many servers that bind port 0 too (GCS, raylet, agents, gRPC); one of them can
take the port between our pick and the server's bind (a benchmark run failed that way). Ports
come instead from 21000-28999: below the ephemeral range and outside Ray's own ranges (worker
ports 10002-19999, Serve direct ingress 30000-31000 and 40000-41000).
"""

from __future__ import annotations

import random
import socket

PORT_RANGE = range(21000, 29000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the ranges Ray and the kernel hand out."""
    for port in random.sample(PORT_RANGE, 200):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE.start}-{PORT_RANGE.stop - 1} on {host}")
