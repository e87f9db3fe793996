"""benchmarks/router_scaling.py: its report without a cluster, and one CPU smoke run of the whole
script (e2e: two Ray nodes on loopback with HAProxy on each, one then two routers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import router_scaling

ROOT = Path(__file__).resolve().parents[2]


def run(routers: int, req_s: float, tok_s: float) -> dict:
    return {"routers": routers, "req_s": req_s, "out_tok_s": tok_s, "ttft_p50_ms": 10.0, "ttft_p90_ms": 20.0,
            "router_ms_per_1k": 50.0, "haproxy_ms_per_1k": 5.0, "model_ms_per_1k": 900.0, "router_busy": 0.5,
            "errors": 0}


def test_summary_takes_each_counts_median_run_and_scales_by_one_router():
    rows = router_scaling.summary_rows([run(1, 100, 3000), run(2, 150, 5000), run(1, 90, 2800),
                                        run(2, 210, 6000), run(1, 120, 3500)])
    assert [(r["routers"], r["req_s"], r["runs"]) for r in rows] == [(1, 100, 3), (2, 210, 2)]
    # two runs: the upper middle; scaling against the one-router median
    assert rows[0]["scaling"] == 1.0 and rows[1]["scaling"] == 2.1
    assert rows[0]["out_tok_s_range"] == [2800, 3500]


def test_smoke_defaults_and_explicit_flags():
    smoke = router_scaling.parse_args(["--smoke"])
    assert (smoke.nodes, smoke.routers, smoke.concurrency, smoke.rounds) == (2, [1, 2], 8, 1)
    full = router_scaling.parse_args(["--routers", "1,3", "--nodes", "3"])
    assert (full.routers, full.nodes, full.concurrency) == ([1, 3], 3, 256)


@pytest.mark.e2e
def test_smoke_run_measures_one_and_two_routers(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "RAYLLM_API_KEYS" and not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "router_scaling.py"), "--smoke",
                           "--results-dir", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next((tmp_path / "out").glob("*-router-scaling.json")).read_text())
    assert [r["routers"] for r in report["summary"]] == [1, 2]
    for row in report["summary"]:
        assert row["errors"] == 0 and row["completed"] > 0 and row["router_ms_per_1k"] > 0
        assert len(set(row["router_nodes"])) == row["routers"]  # one router per node
    # Both routers carried requests (HAProxy spreads the clients' connections): neither idled.
    two = report["summary"][1]
    assert len(two["router_cpu_s"]) == 2 and two["router_cpu_s"][0] > 0.2 * two["router_cpu_s"][1]
