"""Per-hop timestamps of a request's way through the router and the model replica.

Why: a request's first token passes the router's HTTP server, a Ray Serve call, the replica,
vLLM's OpenAI layer and engine, the stream channel and the router again, each in its own
process. Metrics give each process's totals; where the milliseconds of one request go needs
timestamps taken in every process. ``benchmarks/hop_trace.py`` sends requests one at a time
and lines these timestamps up with the client's.

Off unless ``RAYLLM_HOP_TRACE_DIR`` is set when the process starts (``rayllm run`` passes its
environment to Ray's workers): then :func:`mark` appends ``<tag> <wall-clock seconds>`` to
``<dir>/<pid>.txt``. Off, a mark is one call of a function that does nothing.
"""

from __future__ import annotations

import os
import time
from typing import IO

TRACE_DIR_ENV = "RAYLLM_HOP_TRACE_DIR"

# The marks, in the order a streamed request passes them (benchmarks/hop_trace.py reads them).
HOPS = (
    "router.app",          # the router's ASGI application has the request (after uvicorn and Serve)
    "router.forward",      # the route handler starts
    "router.call",         # the Ray Serve call to the model goes out
    "replica.call",        # the replica's method starts (Serve routed and delivered the call)
    "replica.app",         # vLLM's OpenAI application starts on the request
    "replica.engine",      # vLLM submits the request to the engine (parsed, rendered, tokenized)
    "replica.first_output",  # the engine's first output reaches the replica
    "replica.reply",       # the replica has the answer's head and first bytes
    "router.first_frame",  # the router has them from the stream channel
    "router.first_chunk",  # the router hands the first bytes to its HTTP server
)

_file: IO[str] | None = None


def _off(tag: str) -> None:
    return None


def _on(tag: str) -> None:
    global _file
    if _file is None:
        directory = os.environ[TRACE_DIR_ENV]
        os.makedirs(directory, exist_ok=True)
        _file = open(os.path.join(directory, f"{os.getpid()}.txt"), "a", buffering=1)  # noqa: SIM115
    _file.write(f"{tag} {time.time():.6f}\n")


mark = _on if os.environ.get(TRACE_DIR_ENV) else _off
