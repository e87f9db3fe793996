"""Engine guard: when a model replica dies, its vLLM engine processes die with it.

Why: vLLM's engine core is a child process with no watch on its parent. A replica killed
abruptly (Ctrl-C on ``rayllm run`` signals every process of the terminal's group; Ray
kills a replica that misses its health checks; the OOM killer) leaves the engine core and
its workers behind as orphans, busy-polling a core and holding the model's memory.

The guard is a small process in its own session (terminal signals do not reach it) that
polls the replica once a second; when the replica is gone it terminates the engine
processes it was given, matching each by pid and start time so a reused pid is never hit.

    python -m rayllm_app.replica.engine_guard <replica pid> <pid>:<start time> ...
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

logger = logging.getLogger(__name__)
POLL_S = 1.0
GRACE_S = 5.0


def start_guard(engine_pids: list[int]) -> subprocess.Popen | None:
    """Watch this process; if it dies, end ``engine_pids``. None if there is nothing to do."""
    import psutil

    targets = []
    for pid in engine_pids:
        try:
            targets.append(f"{pid}:{psutil.Process(pid).create_time()!r}")
        except psutil.Error:
            continue
    if not targets:
        return None
    return subprocess.Popen([sys.executable, "-m", "rayllm_app.replica.engine_guard", str(os.getpid()), *targets],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def guard(replica: int, targets: list[tuple[int, float]]) -> None:
    import psutil

    replica_started = psutil.Process(replica).create_time()
    while _alive(replica, replica_started):
        time.sleep(POLL_S)
        targets = [(pid, started) for pid, started in targets if _alive(pid, started)]
        if not targets:
            return  # the engine ended on its own (normal shutdown)
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        for pid, started in targets:
            if _alive(pid, started):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(pid, s) for pid, s in targets):
            time.sleep(0.2)


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    replica = int(argv[0])
    targets = []
    for item in argv[1:]:
        pid, _, started = item.partition(":")
        targets.append((int(pid), float(started)))
    try:
        guard(replica, targets)
    except Exception:  # noqa: BLE001 - the replica is already gone; nothing to report to
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
