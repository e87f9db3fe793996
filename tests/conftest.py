"""Session fixtures: one Ray cluster and one Serve application with real vLLM engines.

Engines start once per session (each takes 25-40 s on the CPU): tiny random Llamas built at
test time (one of them, tiny-tools, with a Hermes tool-calling chat template and vLLM's hermes
tool parser), the real SmolLM2 default and the all-MiniLM-L6-v2 embedding model. The
``bare_vllm`` fixture serves tiny-tools a second time with bare
``python -m vllm.entrypoints.openai.api_server`` and the same options, for the differential
tests (tests/e2e/test_vllm_parity_e2e.py, tests/e2e/test_clients_e2e.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from rayllm_app.ports import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TINY_KV_BYTES = 64 * 1024 * 1024


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rayllm_app.storage.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def tiny_model_config(model_id: str, path: Path, **engine_extra) -> dict:
    """A model config for the tiny Llama: one CPU worker, little KV cache, fast start."""
    engine = {
        "model_id": model_id,
        "hf_model_id": str(path),
        "max_total_tokens": 512,
        "engine_kwargs": {"dtype": "float32", "enforce_eager": True,
                          "kv_cache_memory_bytes": TINY_KV_BYTES, "max_num_seqs": 32},
    }
    engine.update(engine_extra)
    return {
        "deployment_config": {"ray_actor_options": {"num_cpus": 1},
                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        "engine_config": engine,
        "scaling_config": {"num_workers": 1, "num_gpus_per_worker": 0, "num_cpus_per_worker": 1},
    }


TINY_A = "tiny-chat"
TINY_B = "tiny-format"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# tiny-format's config stop: a token repeated twice, which a random model almost never
# writes on its own but a logit bias can force.
FORCED_TOKEN = "Ġjumps"
FORCED_STOP = " jumps jumps"
TINY_ZERO = "tiny-zero"      # scales to zero after 4 idle seconds
BROKEN = "broken-model"      # its weights folder is empty: never starts
TINY_TP = "tiny-tp2"          # tensor parallel over a worker group of 2 CPU workers
TINY_S3 = "tiny-s3"           # loaded from a real S3 API (moto server) through the mirror
TINY_TOOLS = "tiny-tools"     # Hermes tool template + hermes tool parser; also served by bare_vllm
EMBED_MODEL = "all-MiniLM-L6-v2"   # models/all-minilm-l6-v2.yaml (384-dimensional embeddings)
TOOLS_TEMPLATE = ROOT / "tests" / "data" / "tiny_tools_template.jinja"
# vLLM keeps /v1/responses with store=true (for GET /v1/responses/{id}) only with this set;
# set for the Ray cluster's processes and for bare_vllm alike.
RESPONSES_STORE_ENV = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
# vLLM frontend options of tiny-tools, as engine_kwargs (rayllm-app) and as CLI flags (bare vLLM).
TINY_TOOLS_FRONTEND = {"chat_template": str(TOOLS_TEMPLATE), "enable_auto_tool_choice": True,
                       "tool_call_parser": "hermes"}
API_KEY = "sk-test-all-models"
LIMITED_KEY = "sk-test-only-tiny-chat"
SECRET_ENV = "RAYLLM_TEST_SECRET"
REDIS_SERVER = "/usr/bin/redis-server"
SECRET_VALUE = "s3cr3t-value-6d1f"


@dataclass
class ServedApp:
    base_url: str  # ends in /v1
    root_url: str
    models: list[str]
    api_key: str = API_KEY

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, api_key: str | None = None, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=api_key or self.api_key, max_retries=0, timeout=120,
                      **kwargs)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # Logical GPUs and an accelerator label let worker-group tests place GPU-shaped groups.
    # address="local": always a fresh cluster of our own, never one another process started.
    ray.init(address="local", num_cpus=32, num_gpus=4, resources={"accelerator_type:A10G": 4},
             include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                       # replicas' stream channels listen on loopback only
                                       "RAYLLM_STREAM_CHANNEL_HOST": "127.0.0.1",
                                       **RESPONSES_STORE_ENV}})
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_model_bucket(tiny_model_path: Path):
    """The tiny model in a bucket of a real S3 API server (moto) on 127.0.0.1."""
    from tests.s3_server import FAKE_CREDENTIALS, MotoS3Server

    server = MotoS3Server().start()
    server.upload_folder(tiny_model_path, "models", "tiny-llama/")
    for name, value in FAKE_CREDENTIALS.items():
        os.environ[name.upper()] = value
    yield server
    server.kill()


@pytest.fixture(scope="session")
def serve_root(ray_cluster) -> str:
    """Ray Serve's HTTP proxy on a free loopback port, shared by every test application."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def served_app(serve_root: str, tiny_model_path: Path, s3_model_bucket) -> ServedApp:
    """Two tiny models (chat template; RayLLM prompt format) plus the SmolLM2 default."""
    from rayllm_app.app import build_app

    tiny_a = tiny_model_config(
        TINY_A, tiny_model_path, model_description="tiny random llama (chat template)",
    )
    tiny_b = tiny_model_config(
        TINY_B, tiny_model_path,
        generation={
            "prompt_format": {"system": "<<SYS>>{instruction}<</SYS>>", "user": "[INST]{system}{instruction}[/INST]",
                              "assistant": "{instruction}</s>", "trailing_assistant": "", "system_in_user": True},
            "generate_kwargs": {"max_tokens": 5, "temperature": 0.0},
            "stopping_sequences": [FORCED_STOP],
        },
    )
    # Small limits so the overload test can fill them: 2 running + 2 queued, then 429.
    tiny_b["deployment_config"].update(max_ongoing_requests=2, max_queued_requests=2)
    tiny_zero = tiny_model_config(
        TINY_ZERO, tiny_model_path,
        runtime_env={"env_vars": {"RAYLLM_MARKER": "zero"}}, propagate_env=[SECRET_ENV],
    )
    tiny_zero["deployment_config"].update(
        autoscaling_config={"min_replicas": 0, "initial_replicas": 1, "max_replicas": 1,
                            "downscale_delay_s": 4, "downscale_to_zero_delay_s": 4,
                            "upscale_delay_s": 0, "metrics_interval_s": 1, "look_back_period_s": 2},
        health_check_period_s=2, health_check_timeout_s=10, cold_start_timeout_s=180,
    )
    empty_folder = tiny_model_path.parent / "not-a-model"
    empty_folder.mkdir(exist_ok=True)
    broken = tiny_model_config(BROKEN, empty_folder)
    broken["deployment_config"]["max_constructor_retry_count"] = 1
    os.environ[SECRET_ENV] = SECRET_VALUE
    tiny_tp = tiny_model_config(
        TINY_TP, tiny_model_path, runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}})
    tiny_tp["engine_config"]["engine_kwargs"]["tensor_parallel_size"] = 2
    tiny_tp["scaling_config"]["num_workers"] = 2
    tiny_s3 = tiny_model_config(
        TINY_S3, Path("unused"), hf_model_id="example-org/tiny-llama",
        s3_mirror_config={"bucket_uri": "s3://models/tiny-llama/", "endpoint_url": s3_model_bucket.url,
                          "region": "us-east-1"},
        propagate_env=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    os.environ["RAYLLM_API_KEYS"] = f"{API_KEY},{LIMITED_KEY}:{TINY_A}"
    tiny_tools = tiny_model_config(TINY_TOOLS, tiny_model_path,
                                   model_description="tiny random llama (hermes tool calling)")
    tiny_tools["engine_config"]["engine_kwargs"].update(TINY_TOOLS_FRONTEND)
    models = [tiny_a, tiny_b, str(ROOT / "models" / "smollm2-135m-instruct.yaml"), tiny_zero, broken,
              tiny_tp, tiny_s3, tiny_tools, str(ROOT / "models" / "all-minilm-l6-v2.yaml")]
    from ray.serve.api import _run

    _run(build_app({"models": models}), name="rayllm", route_prefix="/", _blocking=False)
    root = serve_root
    wait_for_models(root, {TINY_A: "ready", TINY_B: "ready", DEFAULT_MODEL: "ready", BROKEN: "failed",
                           TINY_TP: "ready", TINY_S3: "ready", TINY_TOOLS: "ready", EMBED_MODEL: "ready"},
                    timeout_s=900)
    return ServedApp(base_url=f"{root}/v1", root_url=root, models=[TINY_A, TINY_B, DEFAULT_MODEL])


def wait_for_models(root_url: str, wanted: dict[str, str], timeout_s: float) -> dict:
    """Poll the router's /health until each named model is in the wanted state."""
    import httpx

    deadline = time.monotonic() + timeout_s
    health: dict = {}
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{root_url}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            health = {}
        models = health.get("models", {})
        if all(models.get(m, {}).get("status") == state for m, state in wanted.items()):
            return health
        time.sleep(1)
    raise TimeoutError(f"models not in states {wanted} after {timeout_s}s: {health}")


def engine_requests(model: str) -> int | None:
    """Requests the model's engine still holds; None when this process does not drive the Ray
    cluster (a test run against a server started elsewhere)."""
    try:
        import ray
        from ray import serve

        from rayllm_app.replica.deployment import deployment_name
    except ImportError:
        return None
    if not ray.is_initialized():
        return None

    def ask() -> int:
        handle = serve.get_deployment_handle(deployment_name(model), app_name="rayllm")
        return handle.num_unfinished_requests.remote().result(timeout_s=30)

    # On a worker thread: Serve's blocking calls refuse a thread that runs an event loop, and
    # Playwright's sync API keeps one on the test thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(ask).result()


def wait_engine_idle(model: str, deadline: float) -> int | None:
    """Poll until the model's engine holds no request or ``time.monotonic()`` passes the
    deadline; returns what it still holds (0 when idle)."""
    running = engine_requests(model)
    while running and time.monotonic() < deadline:
        time.sleep(0.5)
        running = engine_requests(model)
    return running


@dataclass
class OpenAIServer:
    base_url: str
    model: str
    api_key: str | None = None


@pytest.fixture(scope="session")
def openai_server(served_app: ServedApp) -> OpenAIServer:
    """Any OpenAI-compatible server with a tiny model (used by the bench smoke test)."""
    return OpenAIServer(base_url=served_app.base_url, model=TINY_A, api_key=served_app.api_key)


@dataclass
class BareVLLM:
    """Bare ``python -m vllm.entrypoints.openai.api_server`` serving tiny-tools."""

    root_url: str
    log_path: Path
    model: str = TINY_TOOLS

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120, **kwargs)


def bare_vllm_command(model_path: Path, port: int) -> list[str]:
    """The bare vLLM server with tiny-tools' engine and frontend options (tiny_model_config's
    engine_kwargs and max_total_tokens, plus TINY_TOOLS_FRONTEND)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_path), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", TINY_TOOLS, "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(TINY_KV_BYTES), "--max-num-seqs", "32", "--max-model-len", "512",
            "--chat-template", TINY_TOOLS_FRONTEND["chat_template"], "--enable-auto-tool-choice",
            "--tool-call-parser", TINY_TOOLS_FRONTEND["tool_call_parser"]]


@pytest.fixture(scope="session")
def bare_vllm(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareVLLM]:
    """Bare vLLM's OpenAI server for tiny-tools (same model folder and options as served_app's
    tiny-tools), for as long as the session runs. Its log: BareVLLM.log_path."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("bare-vllm") / "server.log"
    with running_bare_vllm(bare_vllm_command(tiny_model_path, port), port, log_path) as root:
        yield BareVLLM(root_url=root, log_path=log_path)


@contextlib.contextmanager
def running_bare_vllm(command: list[str], port: int, log_path: Path, timeout_s: float = 300) -> Iterator[str]:
    """Run a bare vLLM server command until the block ends; yields its root URL once it
    serves /v1/models. A server that exits or never serves fails with its log's tail."""
    import httpx

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **RESPONSES_STORE_ENV)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bare vLLM exited with {proc.returncode} before serving; log: {log_path}:\n"
                                   + log_path.read_text(errors="replace")[-4000:])
            try:
                if httpx.get(f"{root}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare vLLM not serving /v1/models after {timeout_s:g} s; log: {log_path}:\n"
                                   + log_path.read_text(errors="replace")[-4000:])
            time.sleep(1)
        yield root
    finally:
        _stop_process_group(proc)


def _stop_process_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the server's process group (API server and its engine core), then SIGKILL."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (the engine core)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on 127.0.0.1 for the session (Debian's; `make redis` installs it)."""
    yield from start_redis()


def start_redis(port: int | None = None):
    """Run redis-server on 127.0.0.1 until the generator closes; yields its URL."""
    if not shutil.which(REDIS_SERVER):
        pytest.skip(f"{REDIS_SERVER} is not installed (apt-get install redis-server)")
    import redis

    port = port or free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def drain(stream, limit: int | None = None, timeout_s: float = 10.0) -> list:
    """Every item of an async iterator (closing it after ``limit`` items), on a fresh event loop."""
    import asyncio

    async def run() -> list:
        items = []
        async for item in stream:
            items.append(item)
            if limit is not None and len(items) >= limit:
                await stream.aclose()
                break
        return items

    return asyncio.run(asyncio.wait_for(run(), timeout_s))
