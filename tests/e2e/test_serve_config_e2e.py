"""`serve run` of the shipped serve config: the fast path (throughput-optimized Serve behind Ray's
HAProxy ingress) comes from the config itself, with two routers behind its one port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import free_port, tiny_model_config
from tests.e2e.test_router_scaleout_e2e import routers_answering

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-serve-config"


@pytest.mark.e2e
def test_shipped_serve_config_runs_the_fast_path(tiny_model_path: Path, tmp_path: Path):
    config = yaml.safe_load((ROOT / "serve_configs" / "smollm2-135m-instruct.yaml").read_text())
    assert config["controller_options"]["runtime_env"]["env_vars"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert config["applications"][0]["runtime_env"]["env_vars"]["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Test-only changes: the tiny model instead of SmolLM2 and the embedder, a free port, two routers.
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"] = {"router": {"replicas": 2}, "models": [tiny_model_config(MODEL, tiny_model_path)]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # A Ray of its own (nothing from the session's), HAProxy's side ports off Ray's fixed ones.
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "RAYLLM_API_KEYS"}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
                "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()), "RAYLLM_SERVE_E2E_MARKER": marker})
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(path)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=5).json()["models"][MODEL]["status"] == "ready":
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
            time.sleep(2)
        listener = next(c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                        and c.status == psutil.CONN_LISTEN)
        assert "haproxy" in psutil.Process(listener.pid).name()
        assert len(routers_answering(base, 2)) == 2
        reply = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        for leftover in psutil.process_iter():  # this Ray's daemons and HAProxy, by the marker in their env
            try:
                if leftover.environ().get("RAYLLM_SERVE_E2E_MARKER") == marker:
                    leftover.kill()
            except (psutil.Error, OSError):
                continue
