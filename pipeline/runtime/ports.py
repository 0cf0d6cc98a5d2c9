"""A free TCP port for a rendezvous, without importing torch (the launch command answers --help at once)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on: the launcher's default (29500) may be taken by another job."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
