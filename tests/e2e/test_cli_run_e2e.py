"""`rayllm run` end to end: its own Ray, the fast path (direct ingress, gRPC handles) and
the stream channel, driven by the openai SDK over 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, tiny_model_config

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-cli"


@pytest.fixture(scope="module")
def rayllm_run(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("cli-run")
    with running_rayllm({MODEL: tiny_model_config(MODEL, tiny_model_path)}, folder) as (base, port, pid):
        yield base, port, folder, pid


@contextlib.contextmanager
def running_rayllm(models: dict[str, dict], folder: Path, extra_args: tuple[str, ...] = (), port: int | None = None):
    """``rayllm run`` of these model configs (the fast path: its own Ray, HAProxy, routers with
    direct ingress), without API keys, until the block ends (or the caller stops it); yields
    (base URL, port, pid) once every model is ready."""
    command = [sys.executable, "-m", "rayllm_app.cli", "run", "--host", "127.0.0.1", "--num-cpus", "8", "--offline"]
    for name, config in models.items():
        (folder / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML
        command += ["--model", str(folder / f"{name}.yaml")]
    port = port or free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAYLLM_STREAM_CHANNEL_HOST": "127.0.0.1",
           "PYTHONPATH": str(ROOT)}
    env.pop("RAYLLM_API_KEYS", None)  # the session app's keys (set by its fixture): no auth here
    log = open(folder / "run.log", "wb")
    proc = subprocess.Popen([*command, "--port", str(port), *extra_args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"rayllm run exited with {proc.returncode}:\n"
                            + (folder / "run.log").read_text(errors="replace")[-3000:])
            try:
                states = httpx.get(f"{base}/health", timeout=5).json()["models"]
                if all(states[name]["status"] == "ready" for name in models):
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("rayllm run not ready after 300 s:\n"
                            + (folder / "run.log").read_text(errors="replace")[-3000:])
            time.sleep(2)
        yield base, port, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):  # the caller may have stopped it
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_fast_path_streams_over_the_channel(rayllm_run):
    from openai import OpenAI

    base, port, _, _ = rayllm_run
    client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL]
    for _ in range(2):  # the second stream reuses the router's connection to the replica
        chunks = list(client.completions.create(model=MODEL, prompt="fast path", max_tokens=10, stream=True,
                                                extra_body={"ignore_eos": True},
                                                stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 10
        assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 1
    # A client that leaves at [DONE] may be ahead of the stream's END frame (its token
    # count); the router keeps that stream open until the frame comes, for a moment.
    for _ in range(50):
        channel = httpx.get(f"{base}/health", timeout=10).json()["stream_channel"]
        if channel["streams"] == 0:
            break
        time.sleep(0.1)
    assert channel == {"streams": 0, "connections": 1}  # all streams closed, one connection kept
    # Refused by the replica before its first byte: the error travels on the channel and
    # still gets its HTTP status.
    error = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True,
                                                       "max_tokens": 10 ** 6}, timeout=30)
    assert error.status_code == 400 and error.json()["error"]["param"] == "max_tokens"


def _title(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline()).strip()
    except psutil.Error:  # exited meanwhile: no title
        return ""


def test_serving_and_engine_processes_run_at_normal_priority(rayllm_run):
    """Ray starts its workers at nice 15 and vLLM inherits it; `rayllm run` asks for nice 0,
    as a bare `vllm serve` has (see cli._serving_ray_defaults)."""
    import psutil

    *_, pid = rayllm_run
    titled = {_title(p): p for p in psutil.Process(pid).children(recursive=True)}
    replicas = {title: p for title, p in titled.items() if title.startswith("ray::ServeReplica")}
    router = next(p for title, p in replicas.items() if title.startswith("ray::ServeReplica:rayllm:router"))
    model = next(p for title, p in replicas.items() if title.startswith(f"ray::ServeReplica:rayllm:model-{MODEL}"))
    # The engine core and its worker are the model replica's children, whatever their title
    # (vLLM renames them VLLM::EngineCore and VLLM::Worker, which does not always take).
    engine = [p for p in model.children(recursive=True)
              if not any(helper in _title(p) for helper in ("engine_guard", "resource_tracker"))]
    assert len(engine) >= 2, [_title(p) for p in model.children(recursive=True)]
    niced = {f"{p.pid} {_title(p)[:60]}": p.nice() for p in (router, model, *engine)}
    assert {name: nice for name, nice in niced.items() if nice != 0} == {}, niced


def test_a_second_run_on_the_same_port_is_refused(rayllm_run, tmp_path: Path):
    _, port, folder, _ = rayllm_run
    out = subprocess.run([sys.executable, "-m", "rayllm_app.cli", "run", "--model", str(folder / "tiny-cli.yaml"),
                          "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2
    assert f"Port {port} on 127.0.0.1 is in use" in out.stderr
