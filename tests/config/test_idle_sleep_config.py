"""deployment_config.idle_sleep: accepted for GPU models (vLLM's sleep mode is switched on),
refused on CPUs with an error naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayllm_app.config import ConfigError, load_model_config


def write_model(tmp_path: Path, gpus: float, idle_sleep: dict) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({
        "deployment_config": {"idle_sleep": idle_sleep},
        "engine_config": {"model_id": "m", "hf_model_id": "/models/m"},
        "scaling_config": {"num_workers": 1, "num_gpus_per_worker": gpus},
    }))
    return path


def test_gpu_model_sleeps_with_vllm_sleep_mode(tmp_path: Path):
    from rayllm_app.app import model_spec
    from rayllm_app.replica.engine import build_engine_kwargs

    config = load_model_config(write_model(tmp_path, 1, {"after_s": 120, "level": 1}))
    assert config.deployment_config.idle_sleep.after_s == 120
    assert build_engine_kwargs(config, "/models/m")["enable_sleep_mode"] is True
    assert model_spec(config)["idle_sleep"] is True


def test_cpu_model_gets_a_clear_error(tmp_path: Path):
    path = write_model(tmp_path, 0, {"after_s": 60})
    with pytest.raises(ConfigError) as error:
        load_model_config(path)
    message = str(error.value)
    assert str(path) in message and "deployment_config.idle_sleep needs GPUs" in message
    assert "num_gpus_per_worker is 0" in message


@pytest.mark.parametrize("idle_sleep, field", [({"after_s": 0}, "after_s"), ({"level": 3}, "level"),
                                               ({"after": 5}, "after")])
def test_bad_values_name_the_field(tmp_path: Path, idle_sleep: dict, field: str):
    with pytest.raises(ConfigError) as error:
        load_model_config(write_model(tmp_path, 1, idle_sleep))
    assert f"deployment_config.idle_sleep.{field}" in str(error.value)
