"""benchmarks/routing.py: its workloads and report without a server, and one CPU smoke run of
the whole script (e2e: two policies, two replicas each, a few requests)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import routing
from rayllm_app.bench.report import RequestRecord, summarize

ROOT = Path(__file__).resolve().parents[2]


def test_the_smoke_run_stays_small_and_explicit_flags_win():
    smoke = routing.parse_args(["--smoke"])
    assert (smoke.policies, smoke.replicas, smoke.kv_cache_bytes) == (["power_of_two", "prefix_aware"], 2, 64 << 20)
    full = routing.parse_args(["--policies", "round_robin,prefix_aware", "--kv-cache-bytes", "1000"])
    assert (full.policies, full.kv_cache_bytes, full.hidden) == (["round_robin", "prefix_aware"], 1000, 512)


def test_workloads_have_the_shapes_they_claim():
    args = routing.parse_args(["--smoke", "--groups", "3", "--prompts", "4", "--users", "2", "--turns", "3"])
    shared = routing.shared_prefix(random.Random(0), args)
    assert len(shared) == 12 and len({m[0]["content"] for m in shared}) == 3  # 3 system prompts, 4 questions each
    system, users = routing.multi_turn(random.Random(0), args)
    assert [len(questions) for questions in users] == [3, 3] and len(set(users[0] + users[1])) == 6
    assert len(system.split()) == args.system_words  # one system prompt for every user
    third = routing.chat(system, [(users[0][0], "a1"), (users[0][1], "a2")], users[0][2])
    assert [m["role"] for m in third] == ["system", "user", "assistant", "user", "assistant", "user"]
    hot = routing.adversarial(random.Random(0), args)
    assert len({m[0]["content"] for m in hot}) == 1 and len({m[1]["content"] for m in hot}) == len(hot)
    # Same seed, same prompts: the three policies of a round get the same work.
    assert routing.shared_prefix(random.Random("0-shared_prefix"), args) == \
        routing.shared_prefix(random.Random("0-shared_prefix"), args)


def _run(workload: str, policy: str, ttft_ms: float, tok: int, hit: float, round_no: int = 1) -> dict:
    records = [RequestRecord(index=i, ok=True, start=0.0, e2e=1.0, ttft=ttft_ms / 1000, output_tokens=tok)
               for i in range(4)]
    result = summarize(records, label="x", config={}, started_at="", duration_s=1.0, num_requests=4)
    return {"workload": workload, "policy": policy, "round": round_no, "hit_rate": hit, "result": result.to_dict()}


def test_summary_compares_each_policy_with_power_of_two_and_judges_the_targets():
    runs = [_run("shared_prefix", "power_of_two", 100, 10, 0.1), _run("shared_prefix", "prefix_aware", 50, 12, 0.8),
            _run("adversarial", "power_of_two", 100, 10, 0.3), _run("adversarial", "prefix_aware", 90, 9, 0.5)]
    rows = {(r["workload"], r["policy"]): r for r in routing.summary_rows(runs)}
    assert rows[("shared_prefix", "prefix_aware")]["ttft_p50_vs_p2c"] == pytest.approx(0.5)
    assert rows[("shared_prefix", "prefix_aware")]["tok_s_vs_p2c"] == pytest.approx(1.2)
    lines = routing.verdicts(routing.summary_rows(runs))
    assert "shared_prefix" in lines[0] and lines[0].endswith("met.")
    assert "adversarial" in lines[1] and "missed" in lines[1]  # 0.90x throughput: outside 5%


def test_policies_are_compared_within_each_round():
    """The host's state swings between rounds: a policy's runs are paired with power-of-two's
    of the same round (geometric mean of the ratios), never median against median."""
    runs = [_run("multi_turn", "power_of_two", 2000, 10, 0.5, 1), _run("multi_turn", "prefix_aware", 1000, 12, 0.7, 1),
            _run("multi_turn", "power_of_two", 400, 10, 0.5, 2), _run("multi_turn", "prefix_aware", 200, 12, 0.7, 2)]
    row = {r["policy"]: r for r in routing.summary_rows(runs)}["prefix_aware"]
    assert row["ttft_p50_vs_p2c_rounds"] == pytest.approx([0.5, 0.5])
    assert row["ttft_p50_vs_p2c"] == pytest.approx(0.5) and row["tok_s_vs_p2c"] == pytest.approx(1.2)


@pytest.mark.e2e
def test_smoke_run_measures_every_policy_and_workload(tmp_path: Path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "RAYLLM_API_KEYS"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--smoke", "--results-dir",
                           str(out), "--assets", str(tmp_path / "assets")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next(out.glob("*-routing.json")).read_text())
    assert {(r["workload"], r["policy"]) for r in report["summary"]} == \
        {(w, p) for w in routing.WORKLOADS for p in ("power_of_two", "prefix_aware")}
    for row in report["summary"]:
        assert row["errors"] == 0 and row["completed"] > 0 and row["ttft_p50_ms"] > 0
    # The engines' counters were read. Multi-turn is the workload sure to hit: a user's next turn
    # starts after the last one ended, and the same replica takes it. (Shared prefix may not:
    # with c=2, a group's two prompts can be prefilled together, before either is cached.)
    turns = {r["policy"]: r for r in report["summary"] if r["workload"] == "multi_turn"}
    assert turns["prefix_aware"]["hit_rate"] > 0, done.stdout[-3000:]
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "assets")], capture_output=True, text=True).stdout
    assert left.strip() == "", "rayllm run left processes behind"


def test_answers_of_word_tokens_come_back_as_the_same_ids(tiny_model_path: Path):
    """The multi-turn workload's premise: an answer the engine generated from word tokens,
    sent back in the next turn's history, renders (chat template included) to the prompt's ids
    and then the very ids generated, so the engine that wrote it finds it in its cache."""
    from transformers import AutoTokenizer

    words = routing.word_tokens(tiny_model_path)
    assert len(words) >= 20
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_path))
    rng = random.Random(3)

    def ids(messages: list[dict], **kwargs) -> list[int]:
        rendered = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)

    for _ in range(10):
        messages = routing.chat("be brief", [], "what is the plan")
        answer = [rng.choice(words) for _ in range(60)]
        prompt = ids(messages, add_generation_prompt=True)
        after = ids(messages + [{"role": "assistant", "content": tokenizer.decode(answer)},
                                {"role": "user", "content": "and then"}], add_generation_prompt=True)
        assert after[:len(prompt) + len(answer)] == prompt + answer
