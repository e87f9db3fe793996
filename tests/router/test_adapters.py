"""Which model names are LoRA adapters (router side), and the lora_config checks of the model
files: ids, aliases, the dynamic path's listing, and errors that name the file and field."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rayllm_app.config import ConfigError, load_model_configs, parse_model_config
from rayllm_app.errors import AdapterNotFoundError
from rayllm_app.router.adapters import AdapterCatalog, AdapterRoute
from rayllm_app.storage.lora_source import check_adapter, list_adapters


def write_adapter(folder: Path, rank: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(f'{{"r": {rank}}}')
    return folder


def base_config(tmp_path: Path, model_id: str = "base", **lora) -> dict:
    return {"engine_config": {"model_id": model_id, "hf_model_id": str(tmp_path)},
            "scaling_config": {"num_gpus_per_worker": 0},
            "lora_config": {"max_lora_rank": 8, **lora}}


@pytest.fixture
def catalog(tmp_path: Path) -> AdapterCatalog:
    write_adapter(tmp_path / "named")
    for name in ("d1", "d2"):
        write_adapter(tmp_path / "dynamic" / name)
    (tmp_path / "dynamic" / "not-an-adapter").mkdir()
    config = base_config(tmp_path, adapters=[{"name": "n1", "source": str(tmp_path / "named"), "aliases": ["sql"]}],
                         dynamic_lora_loading_path=str(tmp_path / "dynamic"), list_ttl_s=0)
    plain = {"engine_config": {"model_id": "plain", "hf_model_id": str(tmp_path)},
             "scaling_config": {"num_gpus_per_worker": 0}}
    return AdapterCatalog([parse_model_config(config), parse_model_config(plain)])


def test_names_resolve_to_the_base_and_the_adapter_id(catalog, tmp_path):
    resolve = lambda name: asyncio.run(catalog.resolve(name))  # noqa: E731
    assert resolve("base:n1") == AdapterRoute("base", "base:n1")
    assert resolve("sql") == AdapterRoute("base", "base:n1")       # an alias
    assert resolve("base:d2") == AdapterRoute("base", "base:d2")   # listed under the dynamic path
    assert resolve("base") is None and resolve("plain:x") is None and resolve("nothing") is None
    with pytest.raises(AdapterNotFoundError) as error:
        resolve("base:not-an-adapter")  # a folder without adapter_config.json
    assert "base:d1" in str(error.value) and "base:n1" in str(error.value)
    write_adapter(tmp_path / "dynamic" / "d3")  # a new folder is found on the next listing
    assert resolve("base:d3") == AdapterRoute("base", "base:d3")


def test_adapter_cards_name_their_parent(catalog):
    card = {"id": "base", "created": 1, "root": "/x", "max_model_len": 512, "metadata": {"capabilities": ["chat"]}}
    cards = {c["id"]: c for c in asyncio.run(catalog.cards(card))}
    assert set(cards) == {"base:n1", "base:d1", "base:d2"}
    assert cards["base:n1"]["parent"] == "base" and cards["base:n1"]["metadata"]["aliases"] == ["sql"]
    assert cards["base:d1"]["metadata"]["adapter"] is True and cards["base:d1"]["max_model_len"] == 512


def test_check_adapter_refuses_a_rank_above_the_limit(tmp_path):
    config = parse_model_config(base_config(tmp_path, dynamic_lora_loading_path=str(tmp_path)))
    assert check_adapter(write_adapter(tmp_path / "ok"), config.lora_config)["r"] == 8
    with pytest.raises(ValueError, match="rank 16 is above the model's lora_config.max_lora_rank 8"):
        check_adapter(write_adapter(tmp_path / "big", rank=16), config.lora_config)
    assert set(list_adapters(config)) == {"ok", "big"}


@pytest.mark.parametrize("lora, message", [
    ({}, "lora_config: Value error, needs adapters, a dynamic_lora_loading_path, or both"),
    ({"adapters": [{"name": "a:b", "source": "/x"}]}, "lora_config.adapters[0].name"),
    ({"adapters": [{"name": "a", "source": "/x", "aliases": ["a"]}]}, "appears twice"),
    ({"dynamic_lora_loading_path": "/x", "max_lora_rank": 12}, "lora_config.max_lora_rank"),
    ({"dynamic_lora_loading_path": "s3://Bad_Bucket/x"}, "lora_config.dynamic_lora_loading_path"),
    ({"dynamic_lora_loading_path": "/x", "s3_mirror_config": {"bucket_uri": "s3://b/"}}, "has no bucket_uri"),
    ({"dynamic_lora_loading_path": "/x", "colour": 1}, "lora_config.colour"),
])
def test_bad_lora_config_names_the_file_and_field(tmp_path, lora, message):
    config = base_config(tmp_path)
    config["lora_config"] = lora
    with pytest.raises(ConfigError) as error:
        parse_model_config(config, "models/base.yaml")
    assert "models/base.yaml" in str(error.value) and message in str(error.value)


def test_lora_settings_in_engine_kwargs_are_refused_and_engine_kwargs_are_derived(tmp_path):
    config = base_config(tmp_path, dynamic_lora_loading_path="/x", max_loras=3, max_adapters_per_replica=5)
    assert parse_model_config(config).lora_config.engine_kwargs() == {
        "enable_lora": True, "max_loras": 3, "max_lora_rank": 8, "max_cpu_loras": 5}
    config["engine_config"]["engine_kwargs"] = {"max_loras": 4}
    with pytest.raises(ConfigError, match="engine_kwargs sets max_loras"):
        parse_model_config(config, "m.yaml")


def test_an_alias_may_not_shadow_another_model(tmp_path):
    other = {"engine_config": {"model_id": "sql", "hf_model_id": str(tmp_path)}}
    base = base_config(tmp_path, adapters=[{"name": "a", "source": "/x", "aliases": ["sql"]}])
    with pytest.raises(ConfigError, match="lora_config adapter name or alias 'sql' is also used by"):
        load_model_configs([other, base])
