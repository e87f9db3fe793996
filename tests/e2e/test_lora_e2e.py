"""End to end: LoRA adapters on one base model, loaded on demand, routed to where they are warm.

One Serve application (``lora``, under /lora) serves the tiny Llama as ``tiny-lora`` on two
replicas, with ``lora_config``: a named adapter in a local folder (alias ``tiny-sql``), more
adapters under an S3 prefix of a real S3 API (moto) as the dynamic path, an adapter whose
rank is too big, and one whose bucket does not exist. Bare vLLM serves the same model with
``--enable-lora --lora-modules`` for the same adapters, as the reference at temperature 0.

Deliberate differences from bare vLLM, named:
- an unknown adapter is our 404 ``adapter_not_found`` listing the base's adapters (vLLM: its
  404 listing the served names);
- adapters load on first use here; bare vLLM loads its ``--lora-modules`` at start;
- on vLLM-CPU, a base-model request batched with adapter requests gets the last adapter slot's
  weights from vLLM's torch LoRA ops (index -1); our vLLM plugin masks those tokens
  (rayllm_app/replica/vllm_plugins.py), so ours stays the base's answer and bare vLLM's may not.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    API_KEY,
    LIMITED_KEY,
    TINY_A,
    TINY_KV_BYTES,
    running_bare_vllm,
    tiny_model_config,
    wait_for_models,
)

pytestmark = pytest.mark.e2e

BASE = "tiny-lora"
APP = "lora"
PREFIX = "/lora"
S3_ADAPTERS = [f"s{i}" for i in range(2, 9)]  # under s3://models/adapters/ (the dynamic path)
PROMPT = "The quick brown fox"


def adapter(name: str) -> str:
    return f"{BASE}:{name}"


@pytest.fixture(scope="module")
def adapters(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory, s3_model_bucket) -> dict[str, Path]:
    """Random rank-8 adapters (seeds differ); "big" has rank 16."""
    from rayllm_app.storage.tiny_lora import build_tiny_lora

    root = tmp_path_factory.mktemp("adapters")
    folders = {name: build_tiny_lora(tiny_model_path, root / name, seed=seed)
               for seed, name in enumerate(["a1", *S3_ADAPTERS], start=1)}
    folders["big"] = build_tiny_lora(tiny_model_path, root / "big", seed=99, rank=16)
    folders["badmod"] = misfit(build_tiny_lora(tiny_model_path, root / "badmod", seed=98))
    s3_model_bucket.client().create_bucket(Bucket="adapters")
    for name in S3_ADAPTERS:
        s3_model_bucket.upload_folder(folders[name], "adapters", f"lora/{name}/", create=False)
    return folders


def misfit(folder: Path) -> Path:
    """The adapter's weights renamed to a module the base model does not have."""
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    save_file({key.replace("q_proj", "nonexistent_proj"): value for key, value in load_file(weights).items()},
              str(weights))
    return folder


@pytest.fixture(scope="module")
def lora_app(serve_root: str, tiny_model_path: Path, adapters: dict[str, Path], s3_model_bucket,
             tmp_path_factory: pytest.TempPathFactory):
    """Our application and bare vLLM with the same adapters, started side by side."""
    from ray.serve.api import _run

    from rayllm_app.app import build_app
    from rayllm_app.ports import free_port

    os.environ.setdefault("RAYLLM_API_KEYS", f"{API_KEY},{LIMITED_KEY}:{TINY_A}")
    base = tiny_model_config(BASE, tiny_model_path, propagate_env=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    base["deployment_config"].update(autoscaling_config={"min_replicas": 2, "max_replicas": 2},
                                     graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.5)
    base["lora_config"] = {
        "adapters": [{"name": "a1", "source": str(adapters["a1"]), "aliases": ["tiny-sql"]},
                     {"name": "big", "source": str(adapters["big"])},
                     {"name": "badmod", "source": str(adapters["badmod"])},
                     {"name": "gone", "source": "s3://no-such-bucket-rayllm/adapter/"}],
        "dynamic_lora_loading_path": "s3://adapters/lora/",
        "s3_mirror_config": {"endpoint_url": s3_model_bucket.url, "region": "us-east-1", "retry_timeout_s": 2},
        "max_loras": 2, "max_lora_rank": 8, "max_adapters_per_replica": 2, "load_retries": 1,
    }
    port = free_port()
    modules = [f"{adapter(name)}={adapters[name]}" for name in ["a1", *S3_ADAPTERS]]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_path),
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", BASE, "--dtype", "float32",
               "--enforce-eager", "--kv-cache-memory-bytes", str(TINY_KV_BYTES), "--max-num-seqs", "32",
               "--max-model-len", "512", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
               "--max-cpu-loras", "2", "--lora-modules", *modules]
    # The router lists the S3 prefix itself: it needs the credentials too.
    router = {"propagate_env": ["RAYLLM_API_KEYS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]}
    _run(build_app({"models": [base], "router": router}), name=APP, route_prefix=PREFIX, _blocking=False)
    log = tmp_path_factory.mktemp("bare-lora") / "server.log"
    with running_bare_vllm(command, port, log) as bare_root:
        root = f"{serve_root}{PREFIX}"
        wait_for_models(root, {BASE: "ready"}, timeout_s=600)
        yield root, bare_root
    from ray import serve

    try:
        serve.delete(APP)
    except TimeoutError:  # a busy host (the whole suite's engines): Serve goes on deleting it
        pass


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def complete(root: str, model: str, max_tokens: int = 12, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{root}/v1/completions", json=body, headers=headers(), timeout=120)


def chat(root: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12, "temperature": 0}
    return httpx.post(f"{root}/v1/chat/completions", json=body, headers=headers(), timeout=120)


def replica_stats() -> dict[str, dict]:
    """Each tiny-lora replica's routing stats (the adapters it holds, its loads), by replica id."""
    import ray

    def ask(handle) -> dict:
        # A replica actor answers before Serve has built the user callable in it (Ray raises
        # AttributeError on '_user_record_routing_stats'): ask again, briefly.
        for _ in range(30):
            try:
                return ray.get(handle.record_routing_stats.remote(), timeout=30)
            except ray.exceptions.RayTaskError as error:
                if "_user_record_routing_stats" not in str(error):
                    raise
                time.sleep(1)
        raise AssertionError("a replica never answered its routing stats")

    stats = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "serve" and entry["name"].startswith(f"SERVE_REPLICA::{APP}#model-{BASE}#"):
            stats[entry["name"].rsplit("#", 1)[-1]] = ask(ray.get_actor(entry["name"], namespace="serve"))
    assert len(stats) == 2, stats
    return stats


def loads(name: str) -> dict[str, int]:
    return {replica: s["adapter_loads"].get(adapter(name), 0) for replica, s in replica_stats().items()}


def test_models_lists_adapters_without_loading_any(lora_app):
    root, _ = lora_app
    cards = {c["id"]: c for c in httpx.get(f"{root}/v1/models", headers=headers(), timeout=30).json()["data"]}
    expected = {BASE, *(adapter(n) for n in ["a1", "big", "gone", *S3_ADAPTERS])}
    assert expected <= set(cards), sorted(cards)
    assert all(cards[adapter(n)]["parent"] == BASE for n in ["a1", "s2"])
    assert cards[adapter("a1")]["metadata"]["aliases"] == ["tiny-sql"]
    assert cards[adapter("s2")]["root"] == "s3://adapters/lora/s2/"
    assert all(not s["adapters"] for s in replica_stats().values())  # listed, not loaded
    card = httpx.get(f"{root}/v1/models/tiny-sql", headers=headers(), timeout=30).json()
    assert card["id"] == adapter("a1") and card["parent"] == BASE


def test_each_adapter_answers_as_bare_vllm_does_and_differs_from_the_base(lora_app):
    root, bare = lora_app
    texts = {}
    for model in [BASE, adapter("a1"), adapter("s2"), adapter("s3")]:
        ours, theirs = complete(root, model), complete(bare, model)
        assert ours.status_code == theirs.status_code == 200, (model, ours.text)
        assert ours.json()["choices"][0]["text"] == theirs.json()["choices"][0]["text"], model
        assert ours.json()["usage"] == theirs.json()["usage"], model
        assert ours.json()["model"] == model
        texts[model] = ours.json()["choices"][0]["text"]
        ours, theirs = chat(root, model), chat(bare, model)
        assert ours.json()["choices"][0]["message"] == theirs.json()["choices"][0]["message"], model
    assert len(set(texts.values())) == 4, texts  # every adapter changes the base's answer
    # The alias is the same adapter; the answer names it by its id.
    by_alias = complete(root, "tiny-sql").json()
    assert by_alias["choices"][0]["text"] == texts[adapter("a1")] and by_alias["model"] == adapter("a1")


def mixed_rounds(root: str, rounds: int = 6) -> tuple[str, list[str]]:
    """The base's greedy answer alone, then its answers while adapter requests run beside it."""
    alone = complete(root, BASE, max_tokens=16).json()["choices"][0]["text"]
    mixed = []
    with ThreadPoolExecutor(4) as pool:
        for _ in range(rounds):
            models = (BASE, adapter("a1"), BASE, adapter("s2"))
            replies = list(pool.map(lambda m: complete(root, m, max_tokens=16), models))
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
            mixed += [replies[0].json()["choices"][0]["text"], replies[2].json()["choices"][0]["text"]]
    return alone, mixed


def test_base_requests_batched_with_adapter_requests_keep_the_base_answer(lora_app):
    root, _ = lora_app
    alone, mixed = mixed_rounds(root)
    assert mixed == [alone] * len(mixed)


def test_openai_sdk_streams_through_an_adapter(lora_app):
    from openai import OpenAI

    root, bare = lora_app
    messages = [{"role": "user", "content": PROMPT}]

    def streamed(base_url: str) -> tuple[str, int]:
        client = OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        text, usage = "", 0
        for chunk in client.chat.completions.create(model=adapter("s4"), messages=messages, max_tokens=16,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    assert streamed(root) == streamed(bare)


def test_concurrent_first_requests_load_once_and_later_requests_stay_on_that_replica(lora_app):
    root, _ = lora_app
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: complete(root, adapter("s5"), max_tokens=4).status_code, range(6)))
    assert statuses == [200] * 6
    first = loads("s5")
    assert sorted(first.values()) == [0, 1], first  # one load, on one replica
    holder = max(first, key=first.get)
    for _ in range(4):
        assert complete(root, adapter("s5"), max_tokens=2).status_code == 200
    time.sleep(3)  # routing stats travel every 2 s
    assert loads("s5") == first  # routed to the holder: no second load anywhere
    assert adapter("s5") in replica_stats()[holder]["adapters"]


def test_least_recently_used_adapter_is_evicted_and_reloads_on_its_next_request(lora_app):
    from rayllm_app.routing.adapter_affinity import rendezvous_score

    root, _ = lora_app
    replicas = sorted(replica_stats())
    # Where the router sends an adapter no replica holds: rendezvous hashing over replica ids.
    # Of 7 adapters, at least 4 go to one replica: take 3 of those.
    owner = {n: max(replicas, key=lambda r: rendezvous_score(adapter(n), r)) for n in S3_ADAPTERS}
    target = max(replicas, key=lambda r: list(owner.values()).count(r))
    x, y, z = [n for n in S3_ADAPTERS if owner[n] == target][:3]
    for name in (x, y, z):
        assert complete(root, adapter(name), max_tokens=2).status_code == 200
    held = replica_stats()[target]["adapters"]
    assert held == [adapter(y), adapter(z)], held  # max_adapters_per_replica 2: x, the least recent, went
    before = loads(x)[target]
    assert complete(root, adapter(x), max_tokens=2).status_code == 200
    assert loads(x)[target] == before + 1  # loaded again
    assert replica_stats()[target]["adapters"] == [adapter(z), adapter(x)]


def test_bad_adapters_get_clear_errors_and_the_rest_keeps_serving(lora_app):
    root, _ = lora_app
    unknown = complete(root, adapter("nope"))
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["code"] == "adapter_not_found" and adapter("a1") in error["message"]
    big = complete(root, adapter("big"))
    assert big.status_code == 400, big.text
    assert "rank 16" in big.json()["error"]["message"] and "max_lora_rank 8" in big.json()["error"]["message"]
    badmod = complete(root, adapter("badmod"))
    assert badmod.status_code == 400, badmod.text
    assert badmod.json()["error"]["code"] == "adapter_mismatch" and "nonexistent_proj" in badmod.text
    assert "stack trace" not in badmod.text  # vLLM's reason, without its wrapper's advice
    gone = complete(root, adapter("gone"))
    assert gone.status_code == 503, gone.text
    message = gone.json()["error"]["message"]
    assert "s3://no-such-bucket-rayllm/adapter/" in message and "fake-secret" not in gone.text
    assert complete(root, "no-such-base:x").status_code == 404
    for model in (BASE, adapter("a1")):
        assert complete(root, model, max_tokens=2).status_code == 200


def test_adapter_metrics_are_exported(lora_app):
    root, _ = lora_app
    assert complete(root, adapter("a1"), max_tokens=3).status_code == 200
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{root}/metrics", headers=headers(), timeout=30).text
        if 'rayllm_lora_requests_total{' in text and "rayllm_lora_loads_total{" in text \
                and "rayllm_lora_evictions_total{" in text:
            break
        time.sleep(2)
    lines = [line for line in text.splitlines() if line.startswith("rayllm_lora_")]
    assert any(line.startswith("rayllm_lora_requests_total{") and 'adapter="tiny-lora:a1"' in line for line in lines)
    assert any(line.startswith("rayllm_lora_generation_tokens_total{") for line in lines)
    assert any(line.startswith("rayllm_lora_load_seconds_total{") for line in lines)
    assert any(line.startswith("rayllm_lora_evictions_total{") for line in lines), lines



FAST = "tiny-lora-fast"


@pytest.fixture(scope="module")
def lora_fast_path(tiny_model_path: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """``rayllm run`` (Ray Serve's throughput-optimized mode with direct ingress: where Ray's own
    adapter routing stops working) serving a LoRA base on two replicas."""
    from tests.e2e.test_cli_run_e2e import running_rayllm

    config = tiny_model_config(FAST, tiny_model_path)
    config["deployment_config"]["autoscaling_config"] = {"min_replicas": 2, "max_replicas": 2}
    config["lora_config"] = {"adapters": [{"name": n, "source": str(adapters[n])} for n in ("a1", "s2")],
                             "max_lora_rank": 8}
    with running_rayllm({FAST: config}, tmp_path_factory.mktemp("lora-fast")) as (root, _, _):
        yield root


def exported_loads(root: str, adapter_id: str) -> float:
    """rayllm_lora_loads_total{result="ok"} of one adapter, summed over the replicas."""
    total = 0.0
    for line in httpx.get(f"{root}/metrics", timeout=30).text.splitlines():
        if line.startswith("rayllm_lora_loads_total{") and f'adapter="{adapter_id}"' in line \
                and 'result="ok"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_fast_path_sends_an_adapter_to_the_one_replica_that_loaded_it(lora_fast_path, lora_app):
    root, (_, bare) = lora_fast_path, lora_app
    name = f"{FAST}:a1"
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: complete(root, name, max_tokens=12), range(6)))
    assert [r.status_code for r in replies] == [200] * 6
    expected = complete(bare, adapter("a1"), max_tokens=12).json()["choices"][0]["text"]
    assert {r.json()["choices"][0]["text"] for r in replies} == {expected}
    deadline = time.monotonic() + 60
    while exported_loads(root, name) < 1 and time.monotonic() < deadline:
        time.sleep(2)
    assert exported_loads(root, name) == 1  # six concurrent first requests, one load
    for _ in range(6):
        assert complete(root, name, max_tokens=2).status_code == 200
    time.sleep(15)  # past Ray's metrics export period
    assert exported_loads(root, name) == 1  # every later request went to the replica holding it
