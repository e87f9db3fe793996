"""Where replicas say whether their engine sleeps, and where the router asks them to.

Ray's internal key-value store (in the GCS, reachable from every process of the cluster)
holds one entry per replica of a model with ``idle_sleep``: its state and when it last said
so (replicas repeat it every ``HEARTBEAT_S``, so the entry of a replica that died goes stale
and is ignored). The router reads them for ``/health`` and the model cards, and writes one
command per model (``sleep`` / ``wake``, numbered) that every replica polls: a broadcast,
which a Ray Serve handle call (one replica per call) cannot do.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

NAMESPACE = "rayllm"
HEARTBEAT_S = 10.0
STALE_S = 3 * HEARTBEAT_S
POLL_S = 1.0


def _kv() -> Any:
    from ray.experimental import internal_kv

    return internal_kv


def _state_prefix(deployment: str) -> bytes:
    return f"sleep/{deployment}/".encode()


def _command_key(deployment: str) -> bytes:
    return f"sleep-command/{deployment}".encode()


def publish_state(deployment: str, replica: str, state: str) -> None:
    kv = _kv()
    kv._internal_kv_put(_state_prefix(deployment) + replica.encode(),
                        json.dumps({"state": state, "at": time.time()}).encode(), overwrite=True, namespace=NAMESPACE)


def read_states(deployment: str) -> dict[str, str]:
    """Replica id -> state, for the replicas that reported within STALE_S (blocking: GCS calls)."""
    kv = _kv()
    states = {}
    now = time.time()
    for key in kv._internal_kv_list(_state_prefix(deployment), namespace=NAMESPACE) or ():
        raw = kv._internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:
            continue
        entry = json.loads(raw)
        if now - entry.get("at", 0) <= STALE_S:
            states[key.decode().rsplit("/", 1)[1]] = entry["state"]
    return states


def send_command(deployment: str, action: str) -> int:
    """Ask every replica of the model to sleep or wake; returns the command's number."""
    kv = _kv()
    raw = kv._internal_kv_get(_command_key(deployment), namespace=NAMESPACE)
    seq = (json.loads(raw)["seq"] if raw else 0) + 1
    kv._internal_kv_put(_command_key(deployment), json.dumps({"seq": seq, "action": action}).encode(),
                        overwrite=True, namespace=NAMESPACE)
    return seq


def read_command(deployment: str) -> tuple[int, str] | None:
    raw = _kv()._internal_kv_get(_command_key(deployment), namespace=NAMESPACE)
    if not raw:
        return None
    entry = json.loads(raw)
    return entry["seq"], entry["action"]


async def follow(controller: Any, deployment: str, replica: str) -> None:
    """The replica's side: report its state (on change and every HEARTBEAT_S) and apply the
    router's commands issued after the replica started."""
    seen = (await asyncio.to_thread(read_command, deployment) or (0, ""))[0]
    reported_at = 0.0
    reported = None
    while True:
        if controller.state != reported or time.monotonic() - reported_at >= HEARTBEAT_S:
            reported = controller.state
            reported_at = time.monotonic()
            await asyncio.to_thread(publish_state, deployment, replica, reported)
        command = await asyncio.to_thread(read_command, deployment)
        if command is not None and command[0] > seen:
            seen = command[0]
            if command[1] == "sleep":
                asyncio.ensure_future(controller.sleep("by hand", drain_s=30.0))
            elif command[1] == "wake":
                asyncio.ensure_future(controller.wake("by hand"))
        await asyncio.sleep(POLL_S)


async def sleep_command(deployment: str, action: str, wait_s: float = 90.0) -> dict[str, str]:
    """The router's side: broadcast ``sleep``/``wake`` and wait (up to ``wait_s``) until every
    reporting replica shows the result; returns their states then."""
    wanted = "sleeping" if action == "sleep" else "awake"
    await asyncio.to_thread(send_command, deployment, action)
    deadline = time.monotonic() + wait_s
    await asyncio.sleep(POLL_S * 1.5)  # every replica polls within POLL_S
    while True:
        states = await asyncio.to_thread(read_states, deployment)
        if (states and all(state == wanted for state in states.values())) or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.25)
