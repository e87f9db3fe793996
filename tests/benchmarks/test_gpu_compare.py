"""benchmarks/gpu_compare.py and its parts (gpu_stacks, gpu_load, gpu_results, gpu_report): the
pure parts (plan, engine arguments, merging samples, the report) without engines, and one CPU
smoke run of the whole script (e2e)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_compare as gc
from benchmarks import gpu_load as load
from benchmarks import gpu_results
from benchmarks import gpu_stacks as stacks
from benchmarks.compare_stacks import ENGINE_KWARGS
from rayllm_app.bench import BenchConfig
from rayllm_app.bench.report import RequestRecord
from rayllm_app.config import load_model_config

ROOT = Path(__file__).resolve().parents[2]
STACKS = ["bare", "rayllm-app", "bare-api2"]


def test_rounds_rotate_the_stack_order_and_levels_ascend():
    slots = gc.plan(STACKS, [64, 1, 256, 16], [256], rounds=3)
    order = [[s.stack for s in slots if s.round_no == r] for r in (1, 2, 3)]
    assert order == [["bare", "rayllm-app", "bare-api2"], ["rayllm-app", "bare-api2", "bare"],
                     ["bare-api2", "bare", "rayllm-app"]]
    assert all(s.levels == (1, 16, 64, 256) for s in slots if s.stack != "bare-api2")


def test_api2_runs_only_its_levels_and_resume_skips_what_is_done():
    assert gc.levels_for("bare-api2", [256, 1, 64], [256, 512]) == [256]
    assert gc.levels_for("bare-api2", [1, 16], [256]) == []
    assert gc.levels_for("bare", [256, 1, 1], [256]) == [1, 256]
    done = {("bare", 1, 1), ("bare-api2", 256, 1), ("rayllm-app", 1, 1), ("rayllm-app", 256, 1)}
    slots = gc.plan(STACKS, [1, 256], [256], rounds=2, done=done)
    assert [(s.round_no, s.stack, s.levels) for s in slots] == [
        (1, "bare", (256,)), (2, "rayllm-app", (1, 256)), (2, "bare-api2", (256,)), (2, "bare", (1, 256))]
    rows = [{"kind": "measure", "stack": "bare", "level": 1, "round": 1}, {"kind": "log", "msg": "x"}]
    assert gpu_results.done_keys(rows) == {("bare", 1, 1)}


def test_smoke_defaults_yield_to_explicit_flags():
    args = gc.parse_args(["--smoke", "--levels", "2,1"])
    assert args.levels == [1, 2] and args.stacks == ["bare", "rayllm-app"] and args.cpu
    assert args.rounds == 1 and args.duration == 3.0 and args.model == "tiny"
    gpu = gc.parse_args([])
    assert gpu.stacks == STACKS and gpu.levels == [1, 16, 64, 256] and gpu.api2_levels == [256]
    assert gpu.coresident and gpu.rounds == 2 and not gpu.cpu


def test_client_split_and_prompt_ids():
    assert load.shares(256, 8) == [32] * 8
    assert load.shares(10, 4) == [3, 3, 2, 2]
    assert load.shares(1, 8) == [1]
    assert load.token_range(49152) == (1000, 48152)
    assert load.token_range(512) == (64, 448)
    cfg = BenchConfig(model="m", input_len=128, output_len=256, temperature=0.0, ignore_eos=True)
    import random

    body = load.request_body(cfg, random.Random(0), 512)
    assert len(body["prompt"]) == 128 and all(64 <= t < 448 for t in body["prompt"])
    assert body["max_tokens"] == 256 and body["ignore_eos"] and body["temperature"] == 0.0 and body["stream"]
    assert body["stream_options"]["include_usage"]


def _record(start: float, ttft: float, gap: float, tokens: int, ok: bool = True) -> RequestRecord:
    if not ok:
        return RequestRecord(index=0, ok=False, start=start, e2e=0.01, error="HTTP 500: boom")
    times = [ttft + i * gap for i in range(tokens)]
    return RequestRecord(index=0, ok=True, start=start, e2e=times[-1], ttft=ttft, prompt_tokens=128,
                         output_tokens=tokens, chunk_times=times, chunk_tokens=[1.0] * tokens,
                         token_source="usage-per-chunk")


def test_merging_client_processes_gives_percentiles_and_throughput():
    cfg = BenchConfig(model="m", concurrency=3, output_len=4, label="bare c=3 r1")
    one = ([_record(0.0, 0.1, 0.01, 4), _record(0.2, 0.3, 0.01, 4)], 0, 0.5)
    two = ([_record(0.0, 0.2, 0.02, 4), _record(0.1, 0.0, 0.0, 0, ok=False)], 0, 1.0)
    result, busy = load.merge([one, two], cfg, elapsed=2.0, started_at="now")
    # the last completion ends at 0.2 + 0.33 = 0.53 s; 12 tokens from 3 good requests
    assert result.duration_s == pytest.approx(0.53)
    assert result.output_throughput == pytest.approx(12 / 0.53)
    assert (result.completed, result.failed, result.cancelled) == (3, 1, 0)
    assert result.ttft_ms.p50 == pytest.approx(200.0) and result.ttft_ms.p99 == pytest.approx(298.0)
    assert result.itl_ms.p50 == pytest.approx(10.0) and result.itl_ms.p90 == pytest.approx(20.0)
    assert busy == pytest.approx(0.5)
    row = load.measurement(result, stack="bare", level=3, round_no=1, procs=2, client_busy=busy, warmup_failed=0)
    assert row["out_tok_s"] == pytest.approx(22.6, abs=0.1) and row["errors"] == 1
    assert row["err_sample"] == ["HTTP 500: boom"] and set(row["ttft_ms"]) == {"p50", "p90", "p99"}
    assert row["e2e_ms"]["p50"] == pytest.approx(260.0)
    # requests cancelled at the drain limit: the whole elapsed time counts
    cut, _ = load.merge([(one[0], 2, 0.1)], cfg, elapsed=5.0, started_at="now")
    assert cut.cancelled == 2 and cut.duration_s == 5.0


def _flags_to_kwargs(flags: list[str]) -> dict:
    """compare_stacks.engine_cli_flags backwards: --a-b 1 -> a_b: '1', a lone flag -> True."""
    out, i = {}, 0
    while i < len(flags):
        key = flags[i][2:].replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            out[key], i = flags[i + 1], i + 2
        else:
            out[key], i = True, i + 1
    return out


def _engine_flags(cmd: list[str]) -> dict:
    start = cmd.index("--served-model-name") + 2
    return _flags_to_kwargs(cmd[start:cmd.index("--host")])


def _yaml_engine(path: Path) -> dict:
    engine = json.loads(path.read_text())["engine_config"]
    return {**engine["engine_kwargs"], "max_model_len": engine["max_total_tokens"]}


def test_rayllm_yaml_has_the_engine_arguments_of_the_bare_command_line(tmp_path: Path):
    args = gc.parse_args(["--tp", "2", "--gpu-fraction", "0.5", "--engine-kwargs", '{"max_num_seqs": 300}',
                          "--out", str(tmp_path)])
    kwargs = stacks.engine_kwargs(args)
    assert kwargs["gpu_memory_utilization"] == 0.28 and kwargs["kv_cache_memory_bytes"] == 16 * 2**30
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["max_num_seqs"] == 300
    bare = stacks.build_command("bare", 9000, args, Path("/models/m8b"), kwargs)
    api2 = stacks.build_command("bare-api2", 9001, args, Path("/models/m8b"), kwargs)
    ray = stacks.build_command("rayllm-app", 9002, args, Path("/models/m8b"), kwargs)
    assert bare[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert api2[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", "/models/m8b"]
    assert api2[-2:] == ["--api-server-count", "2"]
    as_text = {k: str(v) if v is not True else True for k, v in kwargs.items()}
    assert _engine_flags(bare) == _engine_flags(api2) == as_text
    yaml_path = Path(ray[ray.index("--model") + 1])
    assert _yaml_engine(yaml_path) == kwargs
    config = load_model_config(yaml_path)  # the schema accepts it
    assert config.scaling_config.num_workers == 2 and config.scaling_config.num_gpus_per_worker == 0.5
    assert config.deployment_config.max_ongoing_requests == 512 and config.model_id == "m"


def test_cpu_engine_arguments_are_compare_stacks(tmp_path: Path):
    args = gc.parse_args(["--smoke", "--out", str(tmp_path)])
    kwargs = stacks.engine_kwargs(args)
    assert kwargs == ENGINE_KWARGS and "gpu_memory_utilization" not in kwargs
    ray = stacks.build_command("rayllm-app", 9002, args, Path("/models/tiny"), kwargs)
    yaml_path = Path(ray[ray.index("--model") + 1])
    assert _yaml_engine(yaml_path) == kwargs
    assert load_model_config(yaml_path).scaling_config.num_gpus_per_worker == 0


def test_ports_stay_out_of_each_others_ingress_range():
    ports = stacks.pick_ports(STACKS)
    values = sorted(ports.values())
    assert set(ports) == set(STACKS)
    assert all(b - a > stacks.INGRESS_SPAN for a, b in zip(values, values[1:]))


def _measure(stack: str, level: int, round_no: int, tok_s: float, ttft: float, itl: float) -> dict:
    return {"kind": "measure", "stack": stack, "level": level, "round": round_no, "out_tok_s": tok_s,
            "req_s": 1.0, "ttft_ms": {"p50": ttft, "p90": ttft * 2, "p99": ttft * 3},
            "itl_ms": {"p50": itl, "p90": itl * 2, "p99": itl * 3}, "e2e_ms": {"p50": 1000.0, "p90": 1200.0},
            "tpot_ms": {"p50": itl}, "ok": 100, "errors": 0, "cancelled": 0, "err_sample": [],
            "client_busy_max": 0.2}


def _results_fixture(out: Path) -> None:
    meta = {"date": "2026-12-03T10:00:00+00:00", "machine": "NVIDIA H200 (143771 MiB) x1", "cores": 16,
            "versions": {"vllm": "0.24.0", "ray": "2.60.0"}, "commit": "abc1234", "model_path": "/tmp/m8b",
            "served_name": "m", "model": {"hidden_size": 4096, "num_hidden_layers": 32},
            "mode": "co-resident", "engine_kwargs": {"dtype": "bfloat16"}, "rayllm_scaling": {"num_workers": 1},
            "tp": 1, "stacks": STACKS, "levels": [1, 256], "api2_levels": [256], "rounds": 2,
            "duration_s": 15.0, "warmup_requests": 4, "input_len": 128, "output_len": 256, "procs": 8}
    rows = [{"kind": "meta", "meta": meta},
            {"kind": "start", "stack": "bare", "command": ["python", "-m", "vllm"], "pid": 1},
            {"kind": "ready", "stack": "bare", "startup_s": 134.0},
            {"kind": "check", "stack": "bare", "ok": True, "chat_tokens": 16, "greedy_text": "abc"},
            {"kind": "check", "stack": "rayllm-app", "ok": True, "chat_tokens": 16, "greedy_text": "abc"},
            _measure("bare", 1, 1, 220.0, 16.0, 4.5), _measure("bare", 1, 2, 218.0, 15.8, 4.6),
            _measure("bare", 256, 1, 13000.0, 400.0, 17.0), _measure("bare", 256, 2, 14000.0, 420.0, 16.0),
            _measure("rayllm-app", 1, 1, 212.0, 19.0, 4.7), _measure("rayllm-app", 1, 2, 214.0, 19.8, 4.6),
            _measure("rayllm-app", 256, 1, 16900.0, 490.0, 12.3), _measure("rayllm-app", 256, 2, 17100.0, 500.0, 12.4),
            _measure("bare-api2", 256, 1, 15000.0, 450.0, 14.0)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "measure", "stack": "ba'  # torn by a kill
    (out / "results.jsonl").write_text(text)


def test_report_from_a_results_file(tmp_path: Path, capsys: pytest.CaptureFixture):
    _results_fixture(tmp_path)
    assert gc.main(["--report", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stacks"] == STACKS and summary["levels"] == [1, 256]
    bare = summary["cells"]["bare@256"]["out_tok_s"]
    assert (bare["median"], bare["min"], bare["max"], bare["n"]) == (13500.0, 13000.0, 14000.0, 2)
    assert summary["ratios_vs_bare"]["rayllm-app@256"] == pytest.approx(17000 / 13500, abs=1e-3)
    assert summary["ratios_vs_bare"]["bare-api2@256"] == pytest.approx(15000 / 13500, abs=1e-3)
    assert "bare-api2@1" not in summary["cells"]
    md = (tmp_path / "summary.md").read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "NVIDIA H200" in md and "vllm 0.24.0" in md and "`abc1234`" in md and "**co-resident**" in md
    assert "hidden_size 4096, num_hidden_layers 32" in md
    assert ("| 256 | 13,500 (13,000-14,000) | 17,000 (16,900-17,100) | 15,000 | 1.259 | 1.111 |") in md
    assert "| 1 | 219 (218-220) | 213 (212-214) | - | 0.973 | - |" in md
    assert "| 256 | 410 (400-420) | 495 (490-500) | 450 | 16.5 (16.0-17.0) | 12.4 (12.3-12.4) | 14.0 |" in md
    assert "(bare, rayllm-app, bare-api2 / rayllm-app, bare-api2, bare)" in md
    assert "identical in every stack" in md and "ready after 134 s" in md


def test_a_second_run_into_the_same_folder_needs_resume(tmp_path: Path):
    _results_fixture(tmp_path)
    before = (tmp_path / "results.jsonl").read_text()
    assert gc.main(["--out", str(tmp_path)]) == 2
    assert (tmp_path / "results.jsonl").read_text() == before


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    return True
            except OSError:
                continue
    return False


@pytest.mark.e2e
def test_smoke_run_measures_both_stacks_and_stops_them(tmp_path: Path):
    """The whole script on the CPU: two tiny engines at once, levels 1 and 4, one round."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAYLLM_API_KEYS"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_compare.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = gpu_results.read_rows(out / "results.jsonl")
    measures = {(r["stack"], r["level"]): r for r in rows if r["kind"] == "measure"}
    assert set(measures) == {("bare", 1), ("bare", 4), ("rayllm-app", 1), ("rayllm-app", 4)}
    for row in measures.values():
        assert row["errors"] == 0 and row["cancelled"] == 0 and row["ok"] > 0 and row["out_tok_s"] > 0
        assert row["output_len_mismatches"] == 0 and row["ttft_ms"]["p50"] > 0
    assert all(r["ok"] for r in rows if r["kind"] == "check") and sum(r["kind"] == "check" for r in rows) == 2
    for start in (r for r in rows if r["kind"] == "start"):
        assert not _group_alive(start["pid"]), f"{start['stack']} left processes behind"
    md = (out / "summary.md").read_text()
    assert "| c | bare out tok/s | rayllm-app out tok/s | rayllm-app / bare |" in md
