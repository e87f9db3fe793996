"""Router scale-out under `rayllm run`: router replicas behind one port (Ray's HAProxy ingress),
a router's death costs only the requests it held, and a restart right after Ctrl-C gets the
same port back. Real Ray Serve, HAProxy and vLLM; clients over 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import tiny_model_config
from tests.e2e.test_cli_run_e2e import running_rayllm

MODEL = "tiny-routers"
ROUTER_TITLE = "ray::ServeReplica:rayllm:router"


@pytest.fixture(scope="module")
def two_routers(tmp_path_factory: pytest.TempPathFactory):
    from rayllm_app.storage.tiny_model import build_tiny_llama

    folder = tmp_path_factory.mktemp("routers")
    # Wider than the session's tiny model, so that a long stream is still being generated when
    # its router dies (the tiny one writes 1,000 tokens faster than a client thread reads them).
    model = build_tiny_llama(folder / "model", hidden_size=512, num_hidden_layers=4)
    config = tiny_model_config(MODEL, model, max_total_tokens=2048)
    config["engine_config"]["engine_kwargs"]["kv_cache_memory_bytes"] = 256 * 1024 * 1024
    with running_rayllm({MODEL: config}, folder, ("--router-replicas", "2")) as (base, port, pid):
        yield base, port, folder, pid


def routers_answering(base: str, want: int, timeout_s: float = 90) -> set[str]:
    """The router ids /health names over fresh connections, once ``want`` of them answer
    (HAProxy learns of a new router from Serve a moment after it is up)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = set()
        for _ in range(4 * want):
            try:
                seen.add(httpx.get(f"{base}/health", timeout=10, headers={"connection": "close"}).json()["router"])
            except (httpx.HTTPError, ValueError, KeyError):
                continue
        if len(seen) >= want:
            return seen
        time.sleep(1)
    raise AssertionError(f"{want} routers did not answer within {timeout_s:.0f} s: saw {seen}")


class Stream(threading.Thread):
    """One streamed completion on its own connection: which router held it, and how it ended."""

    def __init__(self, base: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.max_tokens = base, max_tokens
        self.router: str | None = None
        self.started = threading.Event()
        self.chunks = 0
        self.done = False
        self.error: str | None = None

    def run(self) -> None:
        body = {"model": MODEL, "prompt": "spread", "max_tokens": self.max_tokens, "stream": True,
                "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{self.base}/v1/completions", json=body, timeout=180) as response:
                self.router = response.headers.get("x-rayllm-router")
                response.raise_for_status()
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.chunks += 1
                        self.started.set()
        except (httpx.HTTPError, OSError) as error:
            self.error = repr(error)
        finally:
            self.started.set()


def test_requests_spread_over_the_router_replicas(two_routers):
    base, *_ = two_routers
    assert len(routers_answering(base, 2)) == 2
    streams = [Stream(base, 16) for _ in range(8)]
    for stream in streams:
        stream.start()
    for stream in streams:
        stream.join(timeout=120)
    assert all(s.done and s.error is None for s in streams), [(s.router, s.error) for s in streams]
    assert len({s.router for s in streams}) == 2  # leastconn over concurrent connections


def router_pids(base: str, want: int, timeout_s: float = 60) -> dict[str, int]:
    """Router replica id -> its process (from /health, reached through HAProxy)."""
    pids: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    while len(pids) < want and time.monotonic() < deadline:
        health = httpx.get(f"{base}/health", timeout=10, headers={"connection": "close"}).json()
        pids[health["router"]] = health["router_pid"]
    assert len(pids) == want, pids
    return pids


def test_killing_a_router_loses_only_the_requests_it_held(two_routers):
    base, _, _, pid = two_routers
    routers_answering(base, 2)
    pids = router_pids(base, 2)
    assert set(pids.values()) <= {p.pid for p in psutil.Process(pid).children(recursive=True)}
    streams = [Stream(base, 1900) for _ in range(8)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(timeout=120)
    live = [s for s in streams if not s.done and s.error is None]  # still streaming when the router dies
    victim_id = streams[0].router
    psutil.Process(pids[victim_id]).kill()
    assert {s.router for s in streams} == set(pids)
    for stream in streams:
        stream.join(timeout=150)
    held = [s for s in live if s.router == victim_id]
    others = [s for s in live if s.router != victim_id]
    assert held and others, [(s.router, s.done, s.error) for s in streams]
    # Every live stream of the killed router broke; every live stream of the other finished whole.
    assert all(not s.done and s.error for s in held), [(s.router, s.done, s.error) for s in held]
    assert all(s.done and s.error is None for s in others), [(s.router, s.done, s.error) for s in others]
    # New requests keep working while Serve replaces the router (HAProxy retries a connection
    # the dead one refuses, and its health check takes it out), and both answer again later.
    for _ in range(5):
        response = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 4},
                              timeout=60, headers={"connection": "close"})
        assert response.status_code == 200, response.text
    again = routers_answering(base, 2, timeout_s=180)
    assert victim_id not in again  # a new replica took its place


def test_restart_right_after_ctrl_c_serves_on_the_same_port(two_routers):
    """The port P bug: a restart within a minute found P in TIME_WAIT, and the router's direct
    ingress quietly took P+1 while the CLI printed P. Behind HAProxy, P is bound with
    SO_REUSEADDR: the second run serves on P at once."""
    base, port, folder, pid = two_routers
    haproxy = [p for p in psutil.Process(pid).children(recursive=True) if "haproxy" in p.name()]
    assert haproxy, "Ray's HAProxy ingress is not running under rayllm run"
    os.killpg(pid, signal.SIGINT)  # Ctrl-C
    stopping = time.monotonic()
    psutil.Process(pid).wait(timeout=120)
    stopped_s = time.monotonic() - stopping
    log = (folder / "run.log").read_text(errors="replace")
    assert "Stopped in" in log, log[-2000:]
    assert not [p for p in haproxy if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    second = folder / "second"
    second.mkdir()
    with running_rayllm({MODEL: json.loads((folder / f"{MODEL}.yaml").read_text())}, second, port=port) as (
            base2, port2, _):
        assert port2 == port
        assert httpx.get(f"{base2}/health", timeout=10).json()["models"][MODEL]["status"] == "ready"
        line = f"Serving {MODEL} on http://127.0.0.1:{port}/v1"  # printed once P answers: a moment after /health
        deadline = time.monotonic() + 60
        while line not in (second / "run.log").read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert line in (second / "run.log").read_text(errors="replace")
    print(f"first run stopped in {stopped_s:.1f} s")
