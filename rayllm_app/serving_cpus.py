"""Keep the serving layer off the CPU cores that vLLM's CPU workers compute on.

Why: on the CPU backend each vLLM worker binds its OpenMP threads to cores of its own and
leaves the rest (``VLLM_CPU_NUM_OF_RESERVED_CPU``) for the front end. A bare ``vllm serve``
has one front-end process; ``rayllm run`` has a router, a replica and an engine core per
model, plus Ray's daemons. Left to the kernel, any of them can land on a compute core and
preempt an OpenMP thread in the middle of a forward pass, and the whole step then waits for
that one thread. Measured on 2 cores with the tiny model: 15-40% more output tokens/s at
concurrency 4-16 once the serving processes stay on the reserved core.

``rayllm run`` owns its local Ray instance, so it watches its own process tree: cores bound
by engine workers are the compute cores, and the serving layer (this driver, Ray's daemons,
the router, the Serve controller, model replicas whose engine is up) is moved, all threads,
to the remaining cores. vLLM's own processes (engine core, workers) stay where vLLM puts
them, as under a bare ``vllm serve``. Processes that may still start an engine keep every
core, since vLLM picks its cores from the affinity it inherits: Ray's raylet (it forks the
workers), idle Ray workers, and model replicas whose engine is not up yet. With no engine
bound (GPUs, ``VLLM_CPU_OMP_THREADS_BIND=all``, scaled to zero) every process gets every
core back.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import psutil

logger = logging.getLogger(__name__)

#: Ray worker processes (titled ``ray::<actor>``) that never start an engine themselves.
NON_ENGINE_ACTORS = ("ray::ServeController", "ray::ProxyActor", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
#: Processes that fork others which may start an engine: they keep every core.
SPAWNERS = ("raylet",)


@dataclass
class ServingCpuKeeper:
    """Re-checks the process tree under ``root`` every ``interval_s`` (see module docstring).

    ``router_titles`` are the titles of actor processes that never start an engine (the
    router replicas); a model replica is moved only once its engine workers exist.
    """

    root: int = field(default_factory=os.getpid)
    router_titles: tuple[str, ...] = ()
    interval_s: float = 3.0
    all_cpus: frozenset[int] = field(default_factory=lambda: frozenset(os.sched_getaffinity(0)))
    serving: frozenset[int] | None = None  # the cores the serving processes are on now
    moved: dict[tuple[int, float], frozenset[int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        if len(self.all_cpus) < 2:
            return
        threading.Thread(target=self._run, name="serving-cpus", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - placement is an optimisation; never stop serving for it
                logger.debug("serving CPU scan failed", exc_info=True)

    def scan(self) -> frozenset[int] | None:
        """One pass; returns the serving cores (None: every process may use every core)."""
        try:
            root = psutil.Process(self.root)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        info = {pid: value for pid, value in ((p.pid, _describe(p)) for p in tree) if value is not None}
        engine_pids = {pid for pid, (_, cpus, _, _) in info.items() if self._is_engine_worker(cpus)}
        compute = frozenset().union(*(info[pid][1] for pid in engine_pids))
        serving = frozenset(self.all_cpus - compute) if compute else None
        serving = serving or None  # every core computes: nothing left to move to
        with_engine = _ancestors(engine_pids, info)
        for pid, (key, _, title, _) in info.items():
            if pid in engine_pids:
                continue
            movable = serving is not None and self._may_move(pid, title, with_engine, info)
            self._place(pid, key, serving if movable else None)
        if serving != self.serving:
            logger.info("serving processes on CPUs %s", sorted(serving) if serving else "all")
        self.serving = serving
        return serving

    def _is_engine_worker(self, cpus: frozenset[int]) -> bool:
        if not cpus or cpus >= self.all_cpus:
            return False
        # Narrowed by someone else; a child of a moved process inherits the serving cores.
        return not (self.serving and cpus <= self.serving)

    def _may_move(self, pid: int, title: str, with_engine: set[int], info: dict) -> bool:
        if title.split(maxsplit=1)[0].rsplit("/", 1)[-1] in SPAWNERS:
            return False
        if title.startswith("ray::"):  # a model replica once its engine is up, or a known non-engine actor
            return pid in with_engine or title.startswith(NON_ENGINE_ACTORS + self.router_titles)
        # Ray's daemons (GCS, log monitor, dashboard) and this driver move. Processes under a Ray
        # worker are vLLM's (engine core; or one that has not forked its workers yet): they stay
        # where vLLM puts them, as under a bare `vllm serve`.
        return not any(info[a][2].startswith("ray::") for a in _ancestors({pid}, info))

    def _place(self, pid: int, key: tuple[int, float], target: frozenset[int] | None) -> None:
        if target is None:
            if key in self.moved:
                _set_all_threads(pid, self.all_cpus)
                del self.moved[key]
            return
        if self.moved.get(key) != target:
            _set_all_threads(pid, target)
            self.moved[key] = target


def _describe(process: psutil.Process) -> tuple[tuple[int, float], frozenset[int], str, int] | None:
    """(pid and start time, CPU affinity, title, parent pid), or None if it is gone."""
    try:
        title = " ".join(process.cmdline()) or process.name()
        return ((process.pid, process.create_time()), frozenset(os.sched_getaffinity(process.pid)), title,
                process.ppid())
    except (psutil.Error, OSError):
        return None


def _ancestors(pids: set[int], info: dict) -> set[int]:
    found: set[int] = set()
    for pid in pids:
        while pid in info and (pid := info[pid][3]) not in found and pid in info:
            found.add(pid)
    return found


def _set_all_threads(pid: int, cpus: frozenset[int]) -> None:
    """Every existing thread (``taskset -a``); threads started later inherit from their creator."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in threads:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # the thread ended, or we may not touch it
            continue
