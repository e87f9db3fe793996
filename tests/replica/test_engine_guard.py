"""The engine guard ends a dead replica's engine processes, and only those."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from rayllm_app.replica import engine_guard


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _gone(proc: subprocess.Popen, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return True
        time.sleep(0.1)
    return False


def test_engine_processes_end_with_their_replica():
    replica, engine, bystander = _sleeper(), _sleeper(), _sleeper()
    try:
        started = psutil.Process(engine.pid).create_time()
        wrong = psutil.Process(bystander.pid).create_time() + 1.0  # a "reused" pid: other start time
        guard = subprocess.Popen([sys.executable, "-m", "rayllm_app.replica.engine_guard", str(replica.pid),
                                  f"{engine.pid}:{started!r}", f"{bystander.pid}:{wrong!r}"],
                                 start_new_session=True)
        time.sleep(1.5)
        assert engine.poll() is None, "the engine lives while its replica does"
        replica.kill()
        replica.wait()
        assert _gone(engine, 15), "the guard ended the orphaned engine"
        assert guard.wait(timeout=15) == 0
        assert bystander.poll() is None, "a pid whose start time differs is left alone"
    finally:
        for proc in (replica, engine, bystander):
            if proc.poll() is None:
                proc.kill()


def test_guard_leaves_after_a_normal_engine_shutdown():
    engine = _sleeper()
    guard = engine_guard.start_guard([engine.pid])  # watches this test process
    assert guard is not None
    engine.kill()
    engine.wait()
    assert guard.wait(timeout=15) == 0  # nothing left to guard: it exits on its own
    assert engine_guard.start_guard([]) is None
