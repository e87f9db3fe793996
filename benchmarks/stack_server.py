"""A serving stack under test: one process group, started, probed until ready, and stopped whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class Server:
    """A stack process in its own process group, so every process it starts can be found and ended.

    Not its own session: Linux's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``,
    on here) shares the CPUs between sessions first, so a server in its own session gets at most
    half of the 2 cores while the load generator wants the rest, however many processes it runs.
    That hit the Ray stacks (router, replica, engine, Ray's own processes) far harder than bare
    vLLM: rayllm-app's TTFT p50 at c=64 went from ~110 ms to 370-1,070 ms. A process group keeps
    the server, the client and everything else in one scheduling group, as on a normal host.
    """

    def __init__(self, name: str, cmd: list[str], log_path: Path, *, cwd: Path, env: dict[str, str]):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, process_group=0)
        self.pgid = self.proc.pid

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def wait_ready(self, base_url: str, model_id: str, timeout: float, api_key: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        probe = json.dumps({"model": model_id, "prompt": "hello", "max_tokens": 1}).encode()
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with code {self.proc.returncode} while starting")
            try:
                with urllib.request.urlopen(urllib.request.Request(base_url + "/models", headers=auth),
                                            timeout=5) as resp:
                    ids = [m.get("id") for m in json.load(resp).get("data", [])]
                if model_id in ids:
                    req = urllib.request.Request(base_url + "/completions", data=probe,
                                                 headers={"Content-Type": "application/json", **auth})
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        if resp.status == 200:
                            return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(2)
        raise RuntimeError(f"not ready after {timeout:.0f}s")

    def group_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) == self.pgid:
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM the stack, then whatever of its process group is left; SIGKILL as a last resort."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            left = self.group_pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            end = time.monotonic() + wait
            while time.monotonic() < end and self.group_pids():
                time.sleep(0.5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log_file.close()
