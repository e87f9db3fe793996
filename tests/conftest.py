"""Session fixtures: one Ray cluster and one Serve application with real vLLM engines.

Engines start once per session (each takes 25-40 s on the CPU): two tiny random Llamas
built at test time, and the real SmolLM2 default.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TINY_KV_BYTES = 64 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rayllm_app.tiny_model import build_tiny_llama

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


@dataclass
class ServedApp:
    base_url: str  # ends in /v1
    root_url: str
    models: list[str]

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120, **kwargs)


def _wait_until_running(app_name: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {app_name} failed: {status}")
        time.sleep(1)
    raise TimeoutError(f"application {app_name} not running after {timeout_s}s: {status}")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def served_app(ray_cluster, tiny_model_path: Path) -> ServedApp:
    """Two tiny models (chat template; RayLLM prompt format) plus the SmolLM2 default."""
    from ray import serve

    from rayllm_app.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
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
    models = [tiny_a, tiny_b, str(ROOT / "models" / "smollm2-135m-instruct.yaml")]
    serve.run(build_app({"models": models}), name="rayllm", route_prefix="/", blocking=False)
    _wait_until_running("rayllm", timeout_s=600)
    root = f"http://127.0.0.1:{port}"
    return ServedApp(base_url=f"{root}/v1", root_url=root, models=[TINY_A, TINY_B, DEFAULT_MODEL])


@dataclass
class OpenAIServer:
    base_url: str
    model: str


@pytest.fixture(scope="session")
def openai_server(served_app: ServedApp) -> OpenAIServer:
    """Any OpenAI-compatible server with a tiny model (used by the bench smoke test)."""
    return OpenAIServer(base_url=served_app.base_url, model=TINY_A)
