"""Serve one local model with Ray Serve LLM (``ray.serve.llm.build_openai_app``) on CPUs.

The peer stack of ``benchmarks/compare_stacks.py``; run it with the peers virtualenv
(``.bench-venvs/peers``, see ``benchmarks/requirements.txt``)::

    .bench-venvs/peers/bin/python benchmarks/ray_serve_llm_launcher.py \\
        --model-id tiny --model-source /tmp/tiny-llama --port 8001 \\
        --engine-kwargs '{"dtype": "float32", "enforce_eager": true, "max_model_len": 2048}'

It starts a private local Ray (``address="local"``: never joins another cluster on the
machine), serves ``/v1`` on ``--host:--port``, prints ``READY`` and blocks until SIGTERM
or Ctrl-C, then shuts Serve and Ray down.

Running Ray Serve LLM 2.60 without GPUs needs two things (checked in
``ray/llm/_internal/serve/core/configs``): ``accelerator_config={"kind": "cpu"}`` (or a
``placement_group_config`` whose bundles have no GPU, from which the same is inferred),
otherwise the default GPU backend asks Ray for ``{"GPU": 1}`` bundles and the replica
never schedules; and no ``accelerator_type``, which is refused with a CPU config. With
the CPU backend Ray Serve LLM switches vLLM to the ``mp`` executor.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def build_llm_config(model_id: str, model_source: str, engine_kwargs: dict, num_cpus_per_worker: float = 1.0):
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_source},
        engine_kwargs=dict(engine_kwargs),
        accelerator_config={"kind": "cpu"},
        placement_group_config={"bundles": [{"CPU": num_cpus_per_worker}], "strategy": "PACK"},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1}},
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )


def enable_fast_path(host: str, port: int) -> int:
    """The same Ray Serve settings `rayllm run` uses (rayllm_app.cli._enable_fast_path): the
    ingress deployment listens on ``port`` itself, handles use gRPC, user code runs on the
    replica's loop. Set before Ray Serve is imported; returns a free port for Serve's proxy."""
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
    os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 100)
    os.environ["RAY_SERVE_DEFAULT_HTTP_HOST"] = host
    # rayllm_app.ports is standard library only, so the peers virtualenv can import it from
    # the checkout; not port 0, which Ray's own servers may take before the proxy binds it.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rayllm_app.ports import free_port

    return free_port(host)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", required=True, help="name clients send as `model`")
    parser.add_argument("--model-source", required=True, help="local model folder (or HF id)")
    parser.add_argument("--engine-kwargs", default="{}", help="JSON object of vLLM engine arguments")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the private Ray")
    parser.add_argument("--fast-path", action="store_true",
                        help="Ray Serve's throughput-optimized mode with direct ingress, as `rayllm run` uses")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    proxy_port = args.port
    if args.fast_path:
        proxy_port = enable_fast_path(args.host, args.port)
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    stop = threading.Event()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    # After ray.init: Ray's core worker installs its own SIGTERM handler (which just dies
    # and leaves the dashboard / runtime-env agents behind); ours shuts down cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": proxy_port})
        config = build_llm_config(args.model_id, args.model_source, json.loads(args.engine_kwargs))
        app = build_openai_app({"llm_configs": [config]})
        t0 = time.monotonic()
        serve.run(app, name="llm", route_prefix="/", blocking=False)
        print(f"READY after {time.monotonic() - t0:.1f}s on http://{args.host}:{args.port}/v1", flush=True)
        deadline = time.monotonic() + 24 * 3600  # a launcher never outlives a day
        while not stop.is_set() and time.monotonic() < deadline:
            stop.wait(1.0)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
