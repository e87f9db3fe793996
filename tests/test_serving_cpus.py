"""The serving-CPU keeper on a real process tree shaped like `rayllm run`'s.

Processes carry the titles Ray and vLLM give theirs (set with ``exec -a``); the "engine
worker" is bound to core 0 with ``taskset``, as vLLM's CPU worker binds its OpenMP threads.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time

import psutil
import pytest

from rayllm_app.serving_cpus import ServingCpuKeeper

ALL = frozenset(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALL) < 2 or 0 not in ALL, reason="needs CPU 0 and one more")


def node(title: str, *children: str, late_child: bool = False) -> str:
    """A bash process titled ``title`` running ``children`` (each a command) in the background."""
    body = " ".join(f"( {child} ) &" for child in children)
    if late_child:  # started after the first scan: inherits whatever the keeper gave its parent
        body += " ( sleep 1.5; exec -a late-child sleep 120 ) &"
    if not body:
        return f"exec -a {shlex.quote(title)} sleep 120"
    return f"exec -a {shlex.quote(title)} bash -c {shlex.quote(body + ' wait; while :; do sleep 60; done')}"


WORKER = "taskset -c 0 sleep 120"
TREE = node(
    "rayllm-driver",
    node("/opt/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp"),
    node("/opt/ray/core/src/ray/raylet/raylet --raylet_socket_name=x",
         node("ray::IDLE"),
         node("ray::ServeController"),
         node("ray::ServeReplica:app:router", late_child=True),
         node("ray::ServeReplica:app:model-a", node("VLLM::EngineCore", WORKER)),
         node("ray::ServeReplica:app:model-b", node("VLLM::EngineCore"))),
)


def _tree(root: subprocess.Popen, needed: set[str]) -> dict[str, psutil.Process]:
    """The tree's processes by role, once every ``needed`` role is there."""
    deadline = time.monotonic() + 20
    while True:
        found = {}
        for process in [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]:
            try:
                title, parent = " ".join(process.cmdline()), " ".join(process.parent().cmdline())
                cpus = os.sched_getaffinity(process.pid)
            except (psutil.Error, OSError):
                continue
            if title.startswith("sleep 1.5"):
                continue  # the late child's timer
            name = "worker" if title == "sleep 120" and cpus == {0} else title.split()[0].rsplit("/", 1)[-1]
            if name.startswith("VLLM"):
                name += " < " + parent.split()[0]
            found.setdefault(name, process)
        if needed <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _cpus(process: psutil.Process) -> frozenset[int]:
    """The affinity of every thread must agree (the keeper moves whole processes)."""
    per_thread = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{process.pid}/task")}
    assert len(per_thread) == 1, per_thread
    return per_thread.pop()


@pytest.fixture
def tree():
    root = subprocess.Popen(["bash", "-c", TREE], start_new_session=True)
    try:
        yield root
    finally:
        os.killpg(root.pid, 9)
        root.wait()


def test_serving_processes_leave_the_engine_cores_and_get_them_back(tree: subprocess.Popen) -> None:
    moved = {"rayllm-driver", "gcs_server", "ray::ServeController", "ray::ServeReplica:app:router",
             "ray::ServeReplica:app:model-a"}
    kept = {"VLLM::EngineCore < ray::ServeReplica:app:model-a",  # vLLM's: placed as vLLM does
            "raylet",  # forks Ray workers: a new replica must see every core
            "ray::IDLE",  # may become a model replica
            "ray::ServeReplica:app:model-b", "VLLM::EngineCore < ray::ServeReplica:app:model-b"}  # engine not up
    processes = _tree(tree, moved | kept | {"worker"})
    keeper = ServingCpuKeeper(root=tree.pid, router_titles=("ray::ServeReplica:app:router",))
    serving = ALL - {0}

    assert keeper.scan() == serving
    assert moved | kept | {"worker"} == set(processes), sorted(processes)
    assert {name: _cpus(processes[name]) for name in moved} == {name: serving for name in moved}
    assert {name: _cpus(processes[name]) for name in kept} == {name: ALL for name in kept}
    assert _cpus(processes["worker"]) == {0}

    # A child started by a moved process inherits the serving cores: it is no engine worker.
    processes = _tree(tree, {"late-child"})
    assert _cpus(processes["late-child"]) == serving
    assert keeper.scan() == serving
    assert _cpus(processes["ray::ServeReplica:app:router"]) == serving

    # The engine goes away (scaled to zero, or a GPU engine): every process gets every core back.
    processes["worker"].kill()
    processes["worker"].wait(10)
    assert keeper.scan() is None
    for name in moved:
        assert _cpus(processes[name]) == ALL, name
