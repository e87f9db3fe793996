"""The replica's LoRA adapter manager, with a fake engine: one load for concurrent first
requests, LRU eviction that spares adapters in use, and each failure's OpenAI error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rayllm_app.config import parse_model_config
from rayllm_app.errors import AdapterNotFoundError, InvalidRequestError, ModelUnavailableError
from rayllm_app.replica.http_forward import Usage
from rayllm_app.replica.lora_adapters import AdapterManager
from rayllm_app.storage.lora_source import AdapterMismatchError
from tests.replica.test_idle_sleep import Recorder


class FakeEngine:
    def __init__(self, fail: dict[str, BaseException] | None = None, load_s: float = 0.02) -> None:
        self.calls: list[str] = []
        self.fail = fail or {}
        self.load_s = load_s

    async def load_adapter(self, name: str, path: str) -> None:
        self.calls.append(f"load {name}")
        await asyncio.sleep(self.load_s)
        if name in self.fail:
            raise self.fail[name]

    async def unload_adapter(self, name: str) -> None:
        self.calls.append(f"unload {name}")


def manager(tmp_path: Path, engine: FakeEngine, names=("a", "b", "c"), list_fn=None, **lora) -> AdapterManager:
    for name in names:
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "adapter_config.json").write_text('{"r": 8}')
    config = parse_model_config({
        "engine_config": {"model_id": "base", "hf_model_id": str(tmp_path)},
        "scaling_config": {"num_gpus_per_worker": 0},
        "lora_config": {"adapters": [{"name": n, "source": str(tmp_path / n)} for n in names],
                        "max_lora_rank": 8, "max_adapters_per_replica": 2, "load_retries": 1, **lora}})
    extra = {"list_fn": list_fn} if list_fn is not None else {}
    return AdapterManager(config, engine, metric=Recorder(), **extra)


async def use(adapters: AdapterManager, adapter: str) -> None:
    await adapters.acquire(adapter)
    adapters.release(adapter)


def test_concurrent_first_requests_share_one_load(tmp_path):
    async def main() -> None:
        engine = FakeEngine()
        adapters = manager(tmp_path, engine)
        await asyncio.gather(*(use(adapters, "base:a") for _ in range(8)))
        assert engine.calls == ["load base:a"] and adapters.held() == ["base:a"]
        assert adapters.loads["base:a"] == 1 and not adapters.active
        await use(adapters, "base:a")
        assert engine.calls == ["load base:a"]  # loaded: no second load

    asyncio.run(main())


def test_least_recently_used_idle_adapter_is_evicted(tmp_path):
    async def main() -> None:
        engine = FakeEngine()
        adapters = manager(tmp_path, engine)
        for name in ("base:a", "base:b", "base:a", "base:c"):
            await use(adapters, name)
        assert adapters.held() == ["base:a", "base:c"]  # b was the least recently used
        assert engine.calls[-1] == "unload base:b"
        recorder = adapters._metric
        assert recorder.values["rayllm_lora_evictions_total"] == [1]
        assert recorder.values["rayllm_lora_loads_total"] == [1, 1, 1]
        await use(adapters, "base:b")  # comes back on its next request
        assert adapters.loads["base:b"] == 2 and "base:b" in adapters.held()

    asyncio.run(main())


def test_an_adapter_in_use_is_never_evicted(tmp_path):
    async def main() -> None:
        engine = FakeEngine()
        adapters = manager(tmp_path, engine)
        await adapters.acquire("base:a")  # a request holds it
        await use(adapters, "base:b")
        await use(adapters, "base:c")
        assert "base:a" in adapters.held() and "unload base:a" not in engine.calls
        adapters.release("base:a")

    asyncio.run(main())


def test_failures_name_the_adapter_and_leave_the_others_serving(tmp_path):
    async def main() -> None:
        engine = FakeEngine(fail={"base:b": AdapterMismatchError("its rank 16 is above 8"),
                                  "base:c": RuntimeError("engine said no")})
        adapters = manager(tmp_path, engine)
        with pytest.raises(AdapterNotFoundError) as unknown:
            await adapters.acquire("base:zzz")
        assert "base:a" in str(unknown.value) and unknown.value.status_code == 404
        with pytest.raises(InvalidRequestError) as mismatch:
            await adapters.acquire("base:b")
        assert mismatch.value.status_code == 400 and "rank 16" in str(mismatch.value)
        assert engine.calls.count("load base:b") == 1  # a misfit is not retried
        with pytest.raises(ModelUnavailableError) as unavailable:
            await adapters.acquire("base:c")
        assert unavailable.value.status_code == 503 and str(tmp_path / "c") in str(unavailable.value)
        assert engine.calls.count("load base:c") == 2  # load_retries: 1
        await use(adapters, "base:a")
        assert adapters.held() == ["base:a"] and not adapters.active

    asyncio.run(main())


def test_a_rank_above_the_engine_limit_is_refused_before_loading(tmp_path):
    async def main() -> None:
        engine = FakeEngine()
        adapters = manager(tmp_path, engine)
        (tmp_path / "a" / "adapter_config.json").write_text('{"r": 16}')
        with pytest.raises(InvalidRequestError) as error:
            await adapters.acquire("base:a")
        assert "rank 16" in str(error.value) and "max_lora_rank 8" in str(error.value)
        assert engine.calls == []

    asyncio.run(main())


def test_a_load_that_hangs_times_out_into_a_503(tmp_path):
    async def main() -> None:
        adapters = manager(tmp_path, FakeEngine(load_s=5), load_timeout_s=0.05, load_retries=0)
        with pytest.raises(ModelUnavailableError) as error:
            await adapters.acquire("base:a")
        assert "load_timeout_s" in str(error.value)

    asyncio.run(main())


def test_tokens_are_counted_per_adapter(tmp_path):
    adapters = manager(tmp_path, FakeEngine())
    adapters.count("base:a", Usage(prompt_tokens=5, completion_tokens=7))
    values = adapters._metric.values
    assert values["rayllm_lora_requests_total"] == [1]
    assert values["rayllm_lora_prompt_tokens_total"] == [5] and values["rayllm_lora_generation_tokens_total"] == [7]


def test_a_named_adapter_loads_without_listing_the_dynamic_path(tmp_path):
    def listing_down(config):
        raise RuntimeError("S3 is unreachable")

    async def main() -> None:
        adapters = manager(tmp_path, FakeEngine(), list_fn=listing_down)
        await use(adapters, "base:a")  # its source is in the model file
        assert adapters.held() == ["base:a"]

    asyncio.run(main())
