"""The rendezvous of a launch without a launcher: ``python launch/pretrain.py`` runs as a world of
one rank, given the environment the ``deepspeed`` launcher sets for each rank it starts."""

from __future__ import annotations

import os
import socket

RENDEZVOUS = ("RANK", "WORLD_SIZE")  # what every launcher (deepspeed, torchrun, mpirun wrappers) sets


def single_process_rendezvous() -> bool:
    """Set a one-rank world's rendezvous (rank 0 of 1, a free local port) when no launcher set one;
    returns whether it did."""
    if any(name in os.environ for name in RENDEZVOUS):
        return False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    return True
