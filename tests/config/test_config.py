"""Unit tests for the model YAML schema and loader (rayllm_app.config) and `rayllm validate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rayllm_app.config import (
    FRONTEND_OPTIONS,
    AutoscalingConfig,
    ConfigError,
    ModelConfig,
    expand_model_paths,
    load_model_config,
    load_model_configs,
    parse_model_config,
    vllm_engine_arg_names,
)

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / "models"
RAYLLM_TEMPLATE = ROOT / "tests" / "data" / "rayllm-template.yaml"
EXAMPLE_FILES = sorted(MODELS_DIR.glob("*.yaml"))


def minimal(model_id: str = "m", **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"engine_config": {"model_id": model_id}}
    for key, value in sections.items():
        if key == "engine_config":
            data["engine_config"].update(value)
        else:
            data[key] = value
    return data


def write(folder: Path, name: str, data: Any) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def config_error(folder: Path, data: Any, name: str = "model.yaml") -> tuple[Path, str]:
    path = write(folder, name, data)
    with pytest.raises(ConfigError) as info:
        load_model_config(path)
    return path, str(info.value)


# ---------------------------------------------------------------- examples and legacy names


def test_example_folder_is_not_empty():
    assert len(EXAMPLE_FILES) >= 4


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_config_loads(path: Path):
    config = load_model_config(path)
    assert isinstance(config, ModelConfig)
    assert config.model_id == yaml.safe_load(path.read_text())["engine_config"]["model_id"]


def test_vllm_is_importable_so_engine_kwargs_are_checked():
    names = vllm_engine_arg_names()
    assert names is not None
    assert {"tensor_parallel_size", "max_model_len", "dtype"} <= names


def test_rayllm_legacy_names_in_mistral_example_are_translated():
    config = load_model_config(MODELS_DIR / "mistral-7b-instruct.yaml")
    assert config.deployment_config.max_ongoing_requests == 64
    assert config.deployment_config.autoscaling_config.target_ongoing_requests == 24
    dumped = config.model_dump()
    assert "max_concurrent_queries" not in dumped["deployment_config"]
    assert "target_num_ongoing_requests_per_replica" not in dumped["deployment_config"]["autoscaling_config"]


def test_rayllm_legacy_names_inline():
    config = parse_model_config(minimal(deployment_config={
        "max_concurrent_queries": 7,
        "autoscaling_config": {"target_num_ongoing_requests_per_replica": 3},
    }))
    assert config.deployment_config.max_ongoing_requests == 7
    assert config.deployment_config.autoscaling_config.target_ongoing_requests == 3
    assert config.deployment_config.autoscaling_config.to_serve()["target_ongoing_requests"] == 3


def test_llm_friendly_autoscaling_defaults():
    scaling = parse_model_config(minimal()).deployment_config.autoscaling_config
    assert scaling.target_ongoing_requests == 16
    assert scaling.downscale_delay_s == 300


def test_hf_model_id_defaults_to_model_id_and_context_length():
    config = parse_model_config(minimal("org/name", engine_config={"max_total_tokens": 1024}))
    assert config.engine_config.model_source == "org/name"
    assert config.engine_config.context_length == 1024
    config = parse_model_config(minimal(engine_config={"engine_kwargs": {"max_model_len": 512}}))
    assert config.engine_config.context_length == 512


# ---------------------------------------------------------------- unknown fields and paths


@pytest.mark.parametrize(
    ("data", "dotted"),
    [
        (minimal(scalling_config={}), "scalling_config"),
        (minimal(engine_config={"modle_id": "x"}), "engine_config.modle_id"),
        (minimal(scaling_config={"num_worker": 1}), "scaling_config.num_worker"),
        (minimal(engine_config={"generation": {"stoping_sequences": []}}),
         "engine_config.generation.stoping_sequences"),
        (minimal(deployment_config={"autoscaling_config": {"min_replica": 1}}),
         "deployment_config.autoscaling_config.min_replica"),
        (minimal(engine_config={"generation": {"prompt_format": {"sytem": "{instruction}"}}}),
         "engine_config.generation.prompt_format.sytem"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unknown_field_names_file_and_dotted_path(tmp_path: Path, data: dict, dotted: str):
    path, message = config_error(tmp_path, data)
    assert message.startswith(str(path))
    assert f"  {dotted}: unknown field" in message


def test_missing_engine_config(tmp_path: Path):
    path, message = config_error(tmp_path, {"scaling_config": {"num_workers": 1}})
    assert str(path) in message
    assert "engine_config: required field is missing" in message


def test_missing_model_id(tmp_path: Path):
    path, message = config_error(tmp_path, {"engine_config": {"hf_model_id": "org/x"}})
    assert str(path) in message
    assert "engine_config.model_id: required field is missing" in message


def test_empty_model_id_rejected():
    with pytest.raises(ConfigError, match=r"engine_config\.model_id"):
        parse_model_config(minimal(""))


@pytest.mark.parametrize(
    ("data", "dotted"),
    [
        (minimal(deployment_config={"max_ongoing_requests": "lots"}), "deployment_config.max_ongoing_requests"),
        (minimal(scaling_config={"num_workers": 0}), "scaling_config.num_workers"),
        (minimal(engine_config={"generation": {"stopping_sequences": "</s>"}}),
         "engine_config.generation.stopping_sequences"),
        (minimal(engine_config={"type": "TGIEngine"}), "engine_config.type"),
        (minimal(engine_config={"max_total_tokens": 8}), "engine_config.max_total_tokens"),
        (minimal(scaling_config={"placement_strategy": "ANYWHERE"}), "scaling_config.placement_strategy"),
        (minimal(deployment_config={"autoscaling_config": {"target_ongoing_requests": 0}}),
         "deployment_config.autoscaling_config.target_ongoing_requests"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_wrong_types_name_the_field(tmp_path: Path, data: dict, dotted: str):
    path, message = config_error(tmp_path, data)
    assert message.startswith(f"{path}: invalid model config")
    assert f"  {dotted}: " in message
    assert "unknown field" not in message


def test_every_error_is_reported_not_only_the_first(tmp_path: Path):
    data = minimal(scaling_config={"num_workers": 0}, deployment_config={"max_ongoing_requests": 0})
    _, message = config_error(tmp_path, data)
    assert "(2 error(s))" in message
    assert "scaling_config.num_workers" in message and "deployment_config.max_ongoing_requests" in message


# ---------------------------------------------------------------- engine_kwargs


def test_unknown_engine_kwargs_rejected_with_valid_list(tmp_path: Path):
    path, message = config_error(tmp_path, minimal(engine_config={"engine_kwargs": {"tensor_paralel_size": 1}}))
    assert str(path) in message
    assert "engine_config.engine_kwargs:" in message
    assert "tensor_paralel_size" in message
    assert "valid ones:" in message
    valid_part = message.split("valid ones:", 1)[1]
    assert "tensor_parallel_size" in valid_part and "gpu_memory_utilization" in valid_part


def test_known_engine_kwargs_accepted():
    config = parse_model_config(minimal(engine_config={"engine_kwargs": {"dtype": "float32", "enforce_eager": True}}))
    assert config.engine_config.engine_kwargs == {"dtype": "float32", "enforce_eager": True}


def test_model_in_engine_kwargs_points_at_hf_model_id(tmp_path: Path):
    _, message = config_error(tmp_path, minimal(engine_config={"engine_kwargs": {"model": "org/x"}}))
    assert "engine_config.engine_kwargs:" in message
    assert "'model' is set by engine_config.hf_model_id" in message


def test_served_model_name_in_engine_kwargs_points_at_model_id():
    with pytest.raises(ConfigError, match=r"'served_model_name' is set by engine_config\.model_id"):
        parse_model_config(minimal(engine_config={"engine_kwargs": {"served_model_name": "x"}}))


def test_max_total_tokens_and_max_model_len_must_agree():
    with pytest.raises(ConfigError, match=r"max_total_tokens \(1024\) and engine_kwargs\.max_model_len \(2048\)"):
        parse_model_config(minimal(engine_config={"max_total_tokens": 1024,
                                                  "engine_kwargs": {"max_model_len": 2048}}))
    same = parse_model_config(minimal(engine_config={"max_total_tokens": 1024,
                                                     "engine_kwargs": {"max_model_len": 1024}}))
    assert same.engine_config.context_length == 1024


def test_parallelism_must_match_num_workers(tmp_path: Path):
    path, message = config_error(tmp_path, minimal(engine_config={"engine_kwargs": {"tensor_parallel_size": 2}}))
    assert str(path) in message
    assert "engine_config.engine_kwargs.tensor_parallel_size (2)" in message
    assert "pipeline_parallel_size (1)" in message
    assert "scaling_config.num_workers (1)" in message


def test_parallelism_product_matching_workers_is_accepted():
    config = parse_model_config(minimal(
        engine_config={"engine_kwargs": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}},
        scaling_config={"num_workers": 4},
    ))
    assert config.scaling_config.num_workers == 4
    with pytest.raises(ConfigError, match=r"pipeline_parallel_size \(2\)"):
        parse_model_config(minimal(
            engine_config={"engine_kwargs": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}},
            scaling_config={"num_workers": 2},
        ))


def test_null_tensor_parallel_size_is_a_config_error():
    with pytest.raises(ConfigError, match=r"tensor_parallel_size"):
        parse_model_config(minimal(engine_config={"engine_kwargs": {"tensor_parallel_size": None}}))


# ---------------------------------------------------------------- deployment / autoscaling


def test_min_replicas_above_max_replicas(tmp_path: Path):
    path, message = config_error(
        tmp_path, minimal(deployment_config={"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}))
    assert str(path) in message
    assert "deployment_config.autoscaling_config:" in message
    assert "min_replicas (3) must not exceed max_replicas (2)" in message


def test_initial_replicas_outside_bounds():
    with pytest.raises(ConfigError, match="initial_replicas must lie between"):
        parse_model_config(minimal(deployment_config={
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 3}}))


def test_unknown_ray_actor_option():
    with pytest.raises(ConfigError, match=r"deployment_config\.ray_actor_options: .*num_gpu"):
        parse_model_config(minimal(deployment_config={"ray_actor_options": {"num_gpu": 1}}))


def test_autoscaling_config_covers_every_ray_serve_field():
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    assert set(AutoscalingConfig.model_fields) == set(RayAutoscalingConfig.model_fields)


def _check_accepted_by_ray(ours: AutoscalingConfig) -> None:
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    serve = ours.to_serve()
    # Ray's model ignores unknown keys, so check the names explicitly, then the values.
    assert set(serve) <= set(RayAutoscalingConfig.model_fields)
    theirs = RayAutoscalingConfig(**serve)
    for key, value in serve.items():
        if key == "aggregation_function":
            assert str(getattr(theirs.aggregation_function, "value", theirs.aggregation_function)) == value
        elif key != "policy":
            assert getattr(theirs, key) == value, key


def test_to_serve_fully_populated_is_accepted_by_ray():
    ours = AutoscalingConfig(
        min_replicas=0, initial_replicas=1, max_replicas=5, target_ongoing_requests=8,
        metrics_interval_s=5, look_back_period_s=20, smoothing_factor=1.5,
        upscale_smoothing_factor=1.1, downscale_smoothing_factor=0.9, upscaling_factor=1.2,
        downscaling_factor=0.5, downscale_delay_s=120, downscale_to_zero_delay_s=900,
        upscale_delay_s=10, aggregation_function="max",
    )
    serve = ours.to_serve()
    assert "policy" not in serve  # None values are left to Ray's defaults
    assert serve["aggregation_function"] == "max"
    _check_accepted_by_ray(ours)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_autoscaling_accepted_by_ray(path: Path):
    _check_accepted_by_ray(load_model_config(path).deployment_config.autoscaling_config)


# ---------------------------------------------------------------- generation


def test_prompt_format_without_instruction(tmp_path: Path):
    path, message = config_error(tmp_path, minimal(engine_config={
        "generation": {"prompt_format": {"user": "[INST] {system} [/INST]", "system_in_user": True}}}))
    assert str(path) in message
    assert "engine_config.generation.prompt_format.user:" in message
    assert "{instruction}" in message


@pytest.mark.parametrize("field", ["system", "assistant"])
def test_other_templates_need_instruction(field: str):
    with pytest.raises(ConfigError, match=rf"engine_config\.generation\.prompt_format\.{field}: .*instruction"):
        parse_model_config(minimal(engine_config={"generation": {"prompt_format": {field: "no placeholder"}}}))


def test_system_in_user_without_system_placeholder(tmp_path: Path):
    _, message = config_error(tmp_path, minimal(engine_config={
        "generation": {"prompt_format": {"user": "[INST] {instruction} [/INST]", "system_in_user": True}}}))
    assert "engine_config.generation.prompt_format:" in message
    assert "{system}" in message and "system_in_user" in message


def test_generate_kwargs_unknown_key(tmp_path: Path):
    _, message = config_error(tmp_path, minimal(engine_config={
        "generation": {"generate_kwargs": {"temprature": 0.5}}}))
    assert "engine_config.generation.generate_kwargs:" in message
    assert "temprature" in message
    assert "'temperature'" in message.split("allowed:", 1)[1]


def test_generate_kwargs_rayllm_spellings_accepted():
    config = parse_model_config(minimal(engine_config={
        "generation": {"generate_kwargs": {"max_new_tokens": 10, "do_sample": False}}}))
    assert config.engine_config.generation.generate_kwargs == {"max_new_tokens": 10, "do_sample": False}


def test_generate_kwargs_stop_must_be_strings(tmp_path: Path):
    _, message = config_error(tmp_path, minimal(engine_config={"generation": {"generate_kwargs": {"stop": [1]}}}))
    assert "engine_config.generation.generate_kwargs:" in message and "stop must be" in message


def generation(**generate_kwargs: Any):
    return parse_model_config(minimal(engine_config={"generation": {"generate_kwargs": generate_kwargs}})
                              ).engine_config.generation


def test_sampling_defaults_normalize_hf_spellings():
    gen = generation(max_new_tokens=10, min_new_tokens=2, do_sample=False, temperature=0.9, stop="###", seed=3)
    assert gen.sampling_defaults() == {"max_tokens": 10, "min_tokens": 2, "temperature": 0.0, "stop": ["###"],
                                       "seed": 3}
    # the raw mapping is kept as written
    assert gen.generate_kwargs["max_new_tokens"] == 10


def test_sampling_defaults_explicit_vllm_spelling_wins():
    gen = generation(max_new_tokens=10, max_tokens=20, min_new_tokens=1, min_tokens=4, do_sample=True)
    assert gen.sampling_defaults() == {"max_tokens": 20, "min_tokens": 4}


def test_sampling_defaults_empty():
    assert generation().sampling_defaults() == {}
    assert generation().request_defaults() == {}
    assert "override_generation_config" not in parse_model_config(minimal()).engine_config.vllm_engine_kwargs()


def test_generate_kwargs_stopping_sequences_is_a_default_stop():
    gen = generation(stopping_sequences=["a", "b"], stop="a")
    assert gen.sampling_defaults()["stop"] == ["a", "b"]
    assert generation(stop=[]).sampling_defaults() == {"stop": []}


def test_request_defaults_are_what_vllm_cannot_apply_server_side():
    gen = generation(temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.1, presence_penalty=0.2,
                     frequency_penalty=0.3, max_new_tokens=64, min_new_tokens=8, stop="x", seed=1, ignore_eos=True,
                     stop_token_ids=[7], skip_special_tokens=False, include_stop_str_in_output=True)
    assert gen.request_defaults() == {"min_tokens": 8, "stop": ["x"], "seed": 1, "ignore_eos": True,
                                      "stop_token_ids": [7], "skip_special_tokens": False,
                                      "include_stop_str_in_output": True}


def test_server_side_defaults_go_to_override_generation_config():
    config = parse_model_config(minimal(engine_config={
        "generation": {"generate_kwargs": {"temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
                                           "repetition_penalty": 1.1, "presence_penalty": 0.2,
                                           "frequency_penalty": 0.3, "max_new_tokens": 64, "seed": 1}}}))
    assert config.engine_config.vllm_engine_kwargs()["override_generation_config"] == {
        "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
        "presence_penalty": 0.2, "frequency_penalty": 0.3, "max_new_tokens": 64}


def test_explicit_override_generation_config_wins_per_key():
    config = parse_model_config(minimal(engine_config={
        "engine_kwargs": {"override_generation_config": {"temperature": 1.0, "top_k": 3}},
        "generation": {"generate_kwargs": {"do_sample": False, "max_tokens": 32}}}))
    assert config.engine_config.vllm_engine_kwargs()["override_generation_config"] == {
        "temperature": 1.0, "top_k": 3, "max_new_tokens": 32}


def test_override_generation_config_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"engine_config\.engine_kwargs: .*override_generation_config"):
        parse_model_config(minimal(engine_config={"engine_kwargs": {"override_generation_config": 1}}))


def test_hf_only_generate_kwargs_are_dropped_with_one_log_line(caplog: pytest.LogCaptureFixture):
    with caplog.at_level("INFO", logger="rayllm_app.config"):
        config = parse_model_config(minimal(engine_config={"generation": {"generate_kwargs": {
            "return_token_type_ids": False, "use_cache": True, "temperature": 0.2}}}), "f.yaml")
    gen = config.engine_config.generation
    assert gen.sampling_defaults() == {"temperature": 0.2}
    lines = [r.getMessage() for r in caplog.records if "generate_kwargs" in r.getMessage()]
    assert lines == ["f.yaml: engine_config.generation.generate_kwargs: ignoring return_token_type_ids, use_cache "
                     "(no vLLM equivalent)"]


# ---------------------------------------------------------------- vLLM frontend options


def test_frontend_options_accepted_and_split_from_engine_args():
    config = parse_model_config(minimal(engine_config={"engine_kwargs": {
        "dtype": "float32", "enable_auto_tool_choice": True, "tool_call_parser": "hermes",
        "chat_template": "{{ messages }}", "response_role": "bot", "max_log_len": 10,
        "reasoning_parser": "deepseek_r1"}}))
    engine = config.engine_config
    assert engine.vllm_engine_kwargs() == {"dtype": "float32", "reasoning_parser": "deepseek_r1"}
    assert engine.vllm_frontend_kwargs() == {"enable_auto_tool_choice": True, "tool_call_parser": "hermes",
                                             "chat_template": "{{ messages }}", "response_role": "bot",
                                             "max_log_len": 10}


def test_frontend_options_are_vllm_frontend_args():
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    assert FRONTEND_OPTIONS <= {f.name for f in dataclasses.fields(FrontendArgs)}
    assert not FRONTEND_OPTIONS & {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert {"reasoning_parser", "runner", "convert"} <= vllm_engine_arg_names()


def test_every_frontend_option_is_accepted():
    config = parse_model_config(minimal(engine_config={"engine_kwargs": dict.fromkeys(FRONTEND_OPTIONS, None)}))
    assert set(config.engine_config.vllm_frontend_kwargs()) == FRONTEND_OPTIONS
    assert config.engine_config.vllm_engine_kwargs() == {}


def test_unknown_key_lists_engine_args_and_frontend_options(tmp_path: Path):
    _, message = config_error(tmp_path, minimal(engine_config={"engine_kwargs": {"tool_parser": "hermes"}}))
    assert "engine_config.engine_kwargs:" in message and "'tool_parser'" in message
    valid_part = message.split("valid ones:", 1)[1]
    assert "tool_call_parser" in valid_part and "max_num_seqs" in valid_part


def test_prompt_format_and_chat_template_conflict(tmp_path: Path):
    path, message = config_error(tmp_path, minimal(engine_config={
        "engine_kwargs": {"chat_template": "{{ x }}"},
        "generation": {"prompt_format": {"user": "{instruction}"}}}))
    assert message.startswith(str(path))
    assert "engine_config.generation.prompt_format" in message
    assert "engine_config.engine_kwargs.chat_template" in message


def test_no_prompt_format_no_chat_template():
    assert parse_model_config(minimal()).engine_config.vllm_frontend_kwargs() == {}


def test_managed_args_are_left_to_the_engine_adapter():
    engine = parse_model_config(minimal("org/x", engine_config={"max_total_tokens": 512})).engine_config
    assert not {"model", "served_model_name", "max_model_len"} & set(engine.vllm_engine_kwargs())


# ---------------------------------------------------------------- capabilities


@pytest.mark.parametrize(("engine_kwargs", "expected"), [
    ({}, ["chat", "completions", "responses", "messages", "tokenize"]),
    ({"enable_auto_tool_choice": True, "tool_call_parser": "hermes"},
     ["chat", "completions", "responses", "messages", "tokenize", "tools"]),
    ({"tool_call_parser": "hermes"}, ["chat", "completions", "responses", "messages", "tokenize", "tools"]),
    ({"reasoning_parser": "deepseek_r1"}, ["chat", "completions", "responses", "messages", "tokenize", "reasoning"]),
    ({"runner": "pooling"}, ["embeddings", "score", "tokenize"]),
    ({"convert": "embed"}, ["embeddings", "score", "tokenize"]),
    ({"convert": "classify"}, ["embeddings", "score", "tokenize"]),
    ({"runner": "generate", "convert": "none"}, ["chat", "completions", "responses", "messages", "tokenize"]),
], ids=["plain", "tools", "parser-only", "reasoning", "pooling", "embed", "classify", "explicit-generate"])
def test_derived_capabilities(engine_kwargs: dict, expected: list[str]):
    assert parse_model_config(minimal(engine_config={"engine_kwargs": engine_kwargs})).capabilities() == expected


def test_explicit_capabilities_override():
    config = parse_model_config(minimal(engine_config={"capabilities": ["completions", "tokenize"],
                                                       "engine_kwargs": {"reasoning_parser": "deepseek_r1"}}))
    assert config.capabilities() == ["completions", "tokenize"]
    assert parse_model_config(minimal(engine_config={"capabilities": []})).capabilities() == []


def test_unknown_capability_names_the_field(tmp_path: Path):
    path, message = config_error(tmp_path, minimal(engine_config={"capabilities": ["chat", "embedding"]}))
    assert message.startswith(str(path))
    assert "engine_config.capabilities[1]:" in message and "'embeddings'" in message


def test_duplicate_capability_rejected():
    with pytest.raises(ConfigError, match=r"engine_config\.capabilities: .*twice"):
        parse_model_config(minimal(engine_config={"capabilities": ["chat", "chat"]}))


# ---------------------------------------------------------------- RayLLM's model template


def test_rayllm_template_loads():
    config = load_model_config(RAYLLM_TEMPLATE)
    engine = config.engine_config
    assert config.model_id == "rayllm-template-smollm2"
    assert config.scaling_config.num_gpus_per_worker == 0
    assert config.deployment_config.autoscaling_config.target_ongoing_requests == 1.0
    assert engine.context_length == 4096  # scheduler.policy.max_total_tokens
    assert engine.max_total_tokens == 4096
    assert engine.vllm_engine_kwargs() == {
        "trust_remote_code": True,
        "max_num_batched_tokens": 140000,
        "override_generation_config": {"max_new_tokens": 512, "top_p": 1.0, "top_k": 0, "temperature": 0.1,
                                       "repetition_penalty": 1.1},
    }
    assert engine.generation.request_defaults() == {"min_tokens": 16}
    assert engine.generation.stopping_sequences == ["### Response:", "### End"]
    assert engine.vllm_frontend_kwargs()["chat_template"].startswith("{#-")
    assert config.capabilities() == ["chat", "completions", "responses", "messages", "tokenize"]


def test_rayllm_template_logs_ignored_scheduler_settings_once(caplog: pytest.LogCaptureFixture):
    with caplog.at_level("INFO", logger="rayllm_app.config"):
        load_model_config(RAYLLM_TEMPLATE)
    lines = [r.getMessage() for r in caplog.records if "scheduler" in r.getMessage()]
    assert lines == [f"{RAYLLM_TEMPLATE}: engine_config.scheduler: ignoring policy.max_batch_prefill_tokens, "
                     "policy.max_input_length, policy.max_iterations_curr_batch, policy.type, "
                     "policy.waiting_served_ratio (no vLLM equivalent)"]


def test_rayllm_template_s3_mirror_block_loads():
    data = yaml.safe_load(RAYLLM_TEMPLATE.read_text())
    data["engine_config"]["s3_mirror_config"] = {
        "bucket_uri": "s3://large-dl-models-mirror/models--mosaicml--mpt-7b-instruct/main-safetensors/"}
    assert parse_model_config(data).engine_config.s3_mirror_config is not None


def test_cli_validate_rayllm_template():
    result = subprocess.run(validate_command(RAYLLM_TEMPLATE), capture_output=True, text=True, cwd=ROOT,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert f"{RAYLLM_TEMPLATE}: ok: model 'rayllm-template-smollm2'" in result.stdout


@pytest.mark.parametrize("engine_type", ["TRTLLMEngine", "TextGenerationInferenceEngine"])
def test_rayllm_engine_types_are_served_by_vllm(engine_type: str, caplog: pytest.LogCaptureFixture):
    with caplog.at_level("INFO", logger="rayllm_app.config"):
        config = parse_model_config(minimal(engine_config={"type": engine_type}), "f.yaml")
    assert config.engine_config.type == engine_type
    assert f"f.yaml: engine_config.type {engine_type}: served by vLLM" in caplog.text


def test_model_init_kwargs_mapping_and_ignored(caplog: pytest.LogCaptureFixture):
    with caplog.at_level("INFO", logger="rayllm_app.config"):
        config = parse_model_config(minimal(engine_config={"model_init_kwargs": {
            "trust_remote_code": True, "torch_dtype": "torch.bfloat16", "revision": "abc", "cache_dir": "/c",
            "device_map": "auto", "low_cpu_mem_usage": True}}), "f.yaml")
    assert config.engine_config.vllm_engine_kwargs() == {
        "trust_remote_code": True, "dtype": "bfloat16", "revision": "abc", "download_dir": "/c"}
    lines = [r.getMessage() for r in caplog.records if "model_init_kwargs" in r.getMessage()]
    assert lines == ["f.yaml: engine_config.model_init_kwargs: ignoring device_map, low_cpu_mem_usage "
                     "(no vLLM equivalent)"]


def test_model_init_kwargs_bad_dtype_names_the_field(tmp_path: Path):
    path, message = config_error(tmp_path, minimal(engine_config={"model_init_kwargs": {"torch_dtype": "int3"}}))
    assert message.startswith(str(path))
    assert "engine_config.model_init_kwargs:" in message and "int3" in message


def test_explicit_engine_kwargs_win_over_rayllm_mappings():
    config = parse_model_config(minimal(engine_config={
        "model_init_kwargs": {"trust_remote_code": True, "torch_dtype": "float16"},
        "scheduler": {"policy": {"max_batch_total_tokens": 9000}},
        "engine_kwargs": {"dtype": "float32", "max_num_batched_tokens": 4096}}))
    assert config.engine_config.vllm_engine_kwargs() == {
        "trust_remote_code": True, "dtype": "float32", "max_num_batched_tokens": 4096}


def test_scheduler_prefill_tokens_used_without_total_tokens():
    config = parse_model_config(minimal(engine_config={"scheduler": {"policy": {"max_batch_prefill_tokens": 8192}}}))
    assert config.engine_config.vllm_engine_kwargs() == {"max_num_batched_tokens": 8192}
    assert config.engine_config.ignored_settings() == {}


def test_scheduler_max_total_tokens_yields_to_explicit_context_length():
    policy = {"scheduler": {"policy": {"max_total_tokens": 4096}}}
    assert parse_model_config(minimal(engine_config={**policy, "max_total_tokens": 1024})
                              ).engine_config.context_length == 1024
    engine = parse_model_config(minimal(engine_config={**policy, "engine_kwargs": {"max_model_len": 2048}})
                                ).engine_config
    assert engine.context_length == 2048 and engine.max_total_tokens is None


def test_scheduler_unknown_keys_are_ignored_with_one_line(caplog: pytest.LogCaptureFixture):
    with caplog.at_level("INFO", logger="rayllm_app.config"):
        parse_model_config(minimal(engine_config={"scheduler": {
            "max_waiting_tokens": 20, "policy": {"max_waiting_tokens": 20, "waiting_served_ratio": 1.2}}}), "f.yaml")
    lines = [r.getMessage() for r in caplog.records if "scheduler" in r.getMessage()]
    assert lines == ["f.yaml: engine_config.scheduler: ignoring max_waiting_tokens, policy.max_waiting_tokens, "
                     "policy.waiting_served_ratio (no vLLM equivalent)"]


@pytest.mark.parametrize(("scheduler", "dotted"), [
    ({"policy": {"max_batch_total_tokens": "many"}}, "engine_config.scheduler.policy.max_batch_total_tokens"),
    ({"policy": {"max_total_tokens": 8}}, "engine_config.scheduler.policy.max_total_tokens"),
    ({"policy": {"max_total_tokens": 1024, "max_input_length": 2048}}, "engine_config.scheduler.policy"),
    ({"policy": [1]}, "engine_config.scheduler.policy"),
    ("fast", "engine_config.scheduler"),
], ids=["type", "too-small", "input-longer", "policy-list", "not-mapping"])
def test_bad_scheduler_names_the_file_and_field(tmp_path: Path, scheduler: Any, dotted: str):
    path, message = config_error(tmp_path, minimal(engine_config={"scheduler": scheduler}))
    assert message.startswith(f"{path}: invalid model config")
    assert f"  {dotted}: " in message


def test_rayllm_config_round_trips_through_model_dump():
    config = load_model_config(RAYLLM_TEMPLATE)
    again = parse_model_config(config.model_dump(mode="json"))
    assert again.engine_config.vllm_engine_kwargs() == config.engine_config.vllm_engine_kwargs()
    assert again.engine_config.context_length == 4096


# ---------------------------------------------------------------- files


def test_invalid_yaml_names_the_file(tmp_path: Path):
    path, message = config_error(tmp_path, "engine_config:\n  model_id: [unclosed\n")
    assert message.startswith(f"{path}: not valid YAML")


def test_unreadable_file_names_the_file(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read model config"):
        load_model_config(missing)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_non_mapping_document(tmp_path: Path, text: str):
    path, message = config_error(tmp_path, text)
    assert message.startswith(f"{path}: expected a mapping with engine_config")


def test_load_model_configs_skips_disabled(tmp_path: Path):
    write(tmp_path, "a.yaml", minimal("a"))
    write(tmp_path, "b.yaml", {"enabled": False, **minimal("b")})
    configs = load_model_configs([tmp_path])
    assert [c.model_id for c in configs] == ["a"]


def test_disabled_duplicate_does_not_conflict(tmp_path: Path):
    write(tmp_path, "a.yaml", minimal("same"))
    write(tmp_path, "b.yaml", {"enabled": False, **minimal("same")})
    assert [c.model_id for c in load_model_configs([tmp_path])] == ["same"]


def test_duplicate_model_ids_name_both_files(tmp_path: Path):
    first = write(tmp_path, "first.yaml", minimal("dup"))
    second = write(tmp_path, "second.yaml", minimal("dup"))
    with pytest.raises(ConfigError) as info:
        load_model_configs([first, second])
    message = str(info.value)
    assert str(first) in message and str(second) in message
    assert "'dup'" in message


def test_folder_expansion(tmp_path: Path):
    write(tmp_path, "b.yml", minimal("b"))
    write(tmp_path, "a.yaml", minimal("a"))
    write(tmp_path, "notes.txt", "not a model")
    single = tmp_path / "a.yaml"
    assert expand_model_paths([tmp_path]) == [tmp_path / "a.yaml", tmp_path / "b.yml"]
    assert expand_model_paths([single]) == [single]
    configs = load_model_configs([tmp_path, {"engine_config": {"model_id": "inline"}}])
    assert [c.model_id for c in configs] == ["a", "b", "inline"]


def test_errors_from_several_files_are_collected(tmp_path: Path):
    write(tmp_path, "a.yaml", {"engine_config": {"modelid": "a"}})
    write(tmp_path, "b.yaml", "engine_config: [\n")
    write(tmp_path, "c.yaml", minimal("c"))
    with pytest.raises(ConfigError) as info:
        load_model_configs([tmp_path])
    message = str(info.value)
    assert str(tmp_path / "a.yaml") in message and "engine_config.modelid: unknown field" in message
    assert f"{tmp_path / 'b.yaml'}: not valid YAML" in message


def test_inline_mapping_error_is_labelled_inline():
    with pytest.raises(ConfigError, match=r"^<inline>: invalid model config"):
        load_model_configs([{"engine_config": {}}])


# ---------------------------------------------------------------- rayllm validate


def validate_command(*paths: Path) -> list[str]:
    return [sys.executable, "-m", "rayllm_app.cli", "validate", *map(str, paths)]


@pytest.fixture(scope="module", autouse=True)
def validate_examples_process():
    """`rayllm validate models/` imports vLLM (~8 s), so start it when this module starts and
    let it run alongside the in-process tests; the CLI test below only collects its result."""
    process = subprocess.Popen(validate_command(MODELS_DIR), cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield process
    if process.poll() is None:
        process.kill()
    process.communicate()


def test_cli_validate_examples_exit_zero(validate_examples_process: subprocess.Popen):
    stdout, stderr = validate_examples_process.communicate(timeout=120)
    assert validate_examples_process.returncode == 0, stderr
    ok_lines = [line for line in stdout.splitlines() if ": ok" in line]
    assert len(ok_lines) == len(EXAMPLE_FILES)
    assert "model 'SmolLM2-135M-Instruct'" in stdout


def test_cli_validate_bad_file_exits_non_zero(tmp_path: Path):
    # No engine_config, so the check fails before vLLM is imported (keeps this test fast).
    bad = write(tmp_path, "bad.yaml", {"enginee_config": {"model_id": "x"}})
    broken = write(tmp_path, "broken.yaml", "a: [\n")
    result = subprocess.run(validate_command(bad, broken), capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode != 0
    assert f"{bad}: invalid model config" in result.stderr
    assert "enginee_config: unknown field" in result.stderr
    assert f"{broken}: not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr
