"""Model lifecycle on real Ray Serve: worker groups, scale to zero, failures, health."""

from __future__ import annotations

import json
import os
import sys
import time

import cloudpickle
import httpx
import pytest

from rayllm_app.config import parse_model_config
from tests.conftest import BROKEN, SECRET_ENV, SECRET_VALUE, TINY_A, TINY_ZERO, wait_for_models

pytestmark = pytest.mark.e2e
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ProbeServer:
    """Stands in for the model server where only the worker-group reservation is under test."""

    def __init__(self, config: dict, responses: dict | None = None) -> None:
        self.config = config

    def replica_info(self) -> dict:
        from rayllm_app.replica.deployment import replica_placement

        return replica_placement()


def gpu_model(model_id: str, workers: int, accelerator: str = "A10G", **scaling) -> dict:
    return {
        "deployment_config": {"ray_actor_options": {"num_cpus": 0.5}, "cold_start_timeout_s": 2,
                              "graceful_shutdown_timeout_s": 1},
        "engine_config": {"model_id": model_id, "hf_model_id": "/unused",
                          "engine_kwargs": {"tensor_parallel_size": workers}},
        "scaling_config": {"num_workers": workers, "num_gpus_per_worker": 1, "num_cpus_per_worker": 1,
                           "accelerator_type": accelerator, **scaling},
    }


def _deploy(configs: list[dict], name: str, blocking: bool = True):
    from ray import serve
    from ray.serve.api import _run

    from rayllm_app.app import build_app_from_configs

    app = build_app_from_configs([parse_model_config(c) for c in configs], server_cls=ProbeServer)
    _run(app, name=name, route_prefix=f"/{name}", _blocking=blocking)
    return serve


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_worker_group_placement(served_app, workers):
    import ray
    from ray import serve
    from ray.util import placement_group_table

    from rayllm_app.replica.deployment import deployment_name

    name = f"pg{workers}"
    _deploy([gpu_model(f"gpu-{workers}", workers)], name)
    try:
        handle = serve.get_deployment_handle(deployment_name(f"gpu-{workers}"), app_name=name)
        info = handle.replica_info.remote().result(timeout_s=60)
        worker = {"CPU": 1.0, "GPU": 1.0, "accelerator_type:A10G": 0.001}
        if workers == 1:  # the engine runs in the replica: one merged bundle, the replica sees the GPU
            expected = [{"CPU": 1.5, "GPU": 1.0, "accelerator_type:A10G": 0.001}]
            assert len(info["gpu_ids"]) == 1
        else:  # the replica's own bundle, then one per worker for the engine's Ray workers
            expected = [{"CPU": 0.5}] + [worker] * workers
            assert info["gpu_ids"] == []
        assert info["bundle_specs"] == expected
        table = placement_group_table()[info["placement_group_id"]]
        assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
        assert ray.available_resources().get("GPU", 0) <= 4 - workers
    finally:
        serve.delete(name)


def test_unsatisfiable_worker_group_fails_with_reason(served_app):
    from ray import serve

    unschedulable = gpu_model("needs-h100", 1, accelerator="H100", pg_timeout_s=3)
    too_big = gpu_model("needs-8-gpus", 8, pg_timeout_s=3)
    _deploy([unschedulable, too_big], "unsat", blocking=False)
    root = f"{served_app.root_url}/unsat"
    try:
        health = wait_for_models(root, {"needs-h100": "failed", "needs-8-gpus": "failed"}, timeout_s=60)
        message = health["models"]["needs-h100"]["message"]
        assert "accelerator_type:H100" in message and "accelerator_type:A10G: 4" in message
        assert "No node is large enough" in health["models"]["needs-8-gpus"]["message"]
        assert health["status"] == "degraded"
        started = time.monotonic()
        response = httpx.post(headers=served_app.headers, url=f"{root}/v1/chat/completions", timeout=30, json={
            "model": "needs-h100", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503 and time.monotonic() - started < 5
        assert "accelerator_type:H100" in response.json()["error"]["message"]
        assert response.headers["retry-after"]
    finally:
        serve.delete("unsat", _blocking=False)


def test_cold_start_timeout_gives_503_with_retry_after(served_app):
    from ray import serve

    _deploy([gpu_model("forever-pending", 1, accelerator="H100", pg_timeout_s=3600)], "pending", blocking=False)
    try:
        started = time.monotonic()
        response = httpx.post(headers=served_app.headers, url=f"{served_app.root_url}/pending/v1/completions", timeout=30,
                              json={"model": "forever-pending", "prompt": "hi"})
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert 1.5 <= elapsed < 10  # cold_start_timeout_s is 2
        assert int(response.headers["retry-after"]) > 0
        assert "did not become ready within 2 s" in response.json()["error"]["message"]
    finally:
        serve.delete("pending", _blocking=False)


def test_broken_model_does_not_take_down_the_others(served_app):
    health = httpx.get(f"{served_app.root_url}/health").json()
    assert health["status"] == "degraded"
    assert health["models"][BROKEN]["status"] == "failed"
    assert health["models"][BROKEN]["message"]  # the reason, e.g. the engine's error
    assert health["models"][TINY_A]["status"] == "ready"
    listed = {m.id for m in served_app.client().models.list().data}
    assert {BROKEN, TINY_A} <= listed
    response = httpx.post(headers=served_app.headers, url=f"{served_app.base_url}/chat/completions", timeout=30, json={
        "model": BROKEN, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert health["models"][BROKEN]["message"] in response.json()["error"]["message"]
    ok = served_app.client().chat.completions.create(model=TINY_A, max_tokens=2,
                                                     messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content is not None


def _zero_handle():
    from ray import serve

    from rayllm_app.replica.deployment import deployment_name

    return serve.get_deployment_handle(deployment_name(TINY_ZERO), app_name="rayllm")


def _replicas(model: str) -> int:
    from ray import serve

    from rayllm_app.replica.deployment import deployment_name

    overview = serve.status().applications["rayllm"].deployments[deployment_name(model)]
    return sum(n for state, n in overview.replica_states.items() if str(getattr(state, "value", state)) != "STOPPED")


def test_runtime_env_and_secrets_reach_the_replica(served_app):
    info = _zero_handle().replica_info.remote().result(timeout_s=300)  # wakes it if it sleeps
    assert info["env"]["RAYLLM_MARKER"] == "zero"
    assert info["env"][SECRET_ENV] == SECRET_VALUE
    assert info["engine_pids"], "the engine core runs as a child of the replica"


def test_scale_to_zero_and_back(served_app):
    client = served_app.client()
    # Idle for downscale_to_zero_delay_s (4 s) -> zero replicas, and no engine memory held.
    wait_for_models(served_app.root_url, {TINY_ZERO: "scaled_to_zero"}, timeout_s=120)
    deadline = time.monotonic() + 60
    while _replicas(TINY_ZERO) and time.monotonic() < deadline:  # the old one drains and stops
        time.sleep(1)
    assert _replicas(TINY_ZERO) == 0
    # Listing models and health checks never wake it.
    for _ in range(3):
        assert TINY_ZERO in {m.id for m in client.models.list().data}
        assert httpx.get(f"{served_app.root_url}/health").json()["models"][TINY_ZERO]["status"] == "scaled_to_zero"
        time.sleep(1)
    assert _replicas(TINY_ZERO) == 0
    # The next request waits through the cold start and succeeds: no 503.
    started = time.monotonic()
    result = client.chat.completions.create(model=TINY_ZERO, max_tokens=3, messages=[{"role": "user", "content": "hi"}],
                                            extra_body={"ignore_eos": True})
    cold_start_s = time.monotonic() - started
    assert result.usage.completion_tokens == 3
    assert _replicas(TINY_ZERO) == 1
    print(f"\ncold start of {TINY_ZERO}: {cold_start_s:.1f} s")


def test_dead_engine_is_detected_and_replaced(served_app):
    """Kill the engine core under a live replica: the health check fails and Serve replaces it."""
    info = _zero_handle().replica_info.remote().result(timeout_s=300)
    for pid in info["engine_pids"]:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 240
    replaced = None
    while time.monotonic() < deadline:
        try:
            candidate = _zero_handle().replica_info.remote().result(timeout_s=30)
            if candidate["pid"] != info["pid"]:
                replaced = candidate
                break
        except Exception:  # noqa: BLE001 - the old replica is going away
            pass
        time.sleep(2)
    assert replaced is not None, "the replica with a dead engine was not replaced"
    result = served_app.client().completions.create(model=TINY_ZERO, prompt="hi", max_tokens=2)
    assert result.choices[0].text is not None


def test_tensor_parallel_engine_across_two_cpu_workers(served_app):
    """tiny-tp2: a worker group of 2 CPU workers, vLLM tensor parallel 2 (local worker processes)."""
    from ray import serve
    from ray.util import placement_group_table

    from rayllm_app.replica.deployment import deployment_name
    from tests.conftest import TINY_TP

    info = serve.get_deployment_handle(deployment_name(TINY_TP), app_name="rayllm").replica_info.remote().result(
        timeout_s=120)
    assert info["bundle_specs"] == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert placement_group_table()[info["placement_group_id"]]["strategy"] == "STRICT_PACK"
    assert len(info["engine_pids"]) >= 3  # engine core + one worker per rank
    result = served_app.client().completions.create(model=TINY_TP, prompt="the quick", max_tokens=8,
                                                    temperature=0, extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 8


def test_model_served_from_s3_mirror(served_app, s3_model_bucket):
    """tiny-s3 was downloaded from a real S3 API (moto) by the mirror before its engine started."""
    from rayllm_app.config import parse_model_config
    from rayllm_app.storage.s3_mirror import mirror_model_with_stats
    from tests.conftest import TINY_S3

    chat = served_app.client().chat.completions.create(
        model=TINY_S3, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 4
    mirror = parse_model_config({"engine_config": {
        "model_id": TINY_S3, "hf_model_id": "example-org/tiny-llama",
        "s3_mirror_config": {"bucket_uri": "s3://models/tiny-llama/", "endpoint_url": s3_model_bucket.url,
                             "region": "us-east-1"}}}).engine_config.s3_mirror_config
    again = mirror_model_with_stats(mirror, "example-org/tiny-llama")  # same node, same cache
    assert again.downloaded_files == 0 and again.downloaded_bytes == 0
    assert (again.path / "config.json").is_file() and "models--example-org--tiny-llama" in str(again.path)


def test_deleting_an_app_drains_in_flight_streams(served_app, tiny_model_path):
    """Removing (or redeploying) a model waits for in-flight streams: graceful_shutdown_timeout_s."""
    from ray import serve
    from ray.serve.api import _run

    from rayllm_app.app import build_app
    from tests.conftest import tiny_model_config, wait_for_models

    config = tiny_model_config("tiny-drain", tiny_model_path)
    config["deployment_config"].update(graceful_shutdown_timeout_s=60, graceful_shutdown_wait_loop_s=0.5)
    _run(build_app({"models": [config]}), name="drain", route_prefix="/drain", _blocking=False)
    wait_for_models(f"{served_app.root_url}/drain", {"tiny-drain": "ready"}, timeout_s=300)
    body = {"model": "tiny-drain", "prompt": "x", "max_tokens": 480, "n": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{served_app.root_url}/drain/v1/completions", json=body,
                      headers=served_app.headers, timeout=120) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        serve.delete("drain", _blocking=False)  # shut the app down while the stream is running
        rest = [line for line in lines if line]
    assert json.loads(first[6:])["choices"]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    final = json.loads(rest[-2][6:])
    assert final["usage"]["completion_tokens"] == 4 * 480  # nothing was cut
    deadline = time.monotonic() + 60
    while "drain" in serve.status().applications and time.monotonic() < deadline:
        time.sleep(1)
    assert "drain" not in serve.status().applications
