"""rayllm_app/observability/hop_trace.py (marks off and on) and benchmarks/hop_trace.py (lining
marks up with the client's requests), without a server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import hop_trace as bench
from rayllm_app.observability import hop_trace

ROOT = Path(__file__).resolve().parents[2]


def test_marks_are_off_without_the_environment_variable():
    assert os.environ.get(hop_trace.TRACE_DIR_ENV) is None
    assert hop_trace.mark is hop_trace._off


def test_marks_go_to_a_file_per_process_when_on(tmp_path):
    code = ("from rayllm_app.observability import hop_trace; "
            "hop_trace.mark('router.app'); hop_trace.mark('router.forward')")
    env = {**os.environ, hop_trace.TRACE_DIR_ENV: str(tmp_path / "hops")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
    (trace,) = (tmp_path / "hops").glob("*.txt")
    tags = [line.split()[0] for line in trace.read_text().splitlines()]
    assert tags == ["router.app", "router.forward"]
    marks = bench.read_marks(tmp_path / "hops")
    assert [tag for _, tag in marks] == tags and marks[0][0] <= marks[1][0]


def test_each_request_gets_the_marks_inside_its_window_in_hop_order():
    marks = sorted([
        (10.001, "router.app"), (10.002, "router.call"), (10.005, "replica.call"),
        (10.0095, "router.first_chunk"),
        (10.012, "router.app"),  # after the first request's first bytes: not its mark
        (20.001, "router.app"), (20.003, "router.call"), (20.004, "replica.call"),
        (20.009, "router.first_chunk"),
    ])
    hops = bench.hops_of(marks, [(10.000, 10.010), (20.000, 20.010)])
    assert hops["client.sent -> router.app"] == pytest.approx([1.0, 1.0])
    assert hops["router.call -> replica.call"] == pytest.approx([3.0, 1.0])
    assert hops["router.first_chunk -> client.first_bytes"] == pytest.approx([0.5, 1.0])
    assert set(hops) == {"client.sent -> router.app", "router.app -> router.call",
                         "router.call -> replica.call", "replica.call -> router.first_chunk",
                         "router.first_chunk -> client.first_bytes"}


def test_a_mark_that_repeats_inside_a_window_counts_once():
    marks = [(1.001, "router.app"), (1.002, "router.app"), (1.003, "router.forward")]
    hops = bench.hops_of(marks, [(1.0, 1.004)])
    assert hops["router.app -> router.forward"] == pytest.approx([2.0])


def test_every_hop_name_is_marked_somewhere_in_the_package():
    sources = "\n".join(path.read_text() for path in (ROOT / "rayllm_app").rglob("*.py"))
    for tag in hop_trace.HOPS:
        assert f'hop_trace.mark("{tag}")' in sources, tag
