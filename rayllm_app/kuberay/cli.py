"""``rayllm kuberay render``: its arguments, the canonical command line, the YAML it writes."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from rayllm_app.config import ConfigError
from rayllm_app.config.router_settings import router_replicas_arg
from rayllm_app.kuberay.groups import manifest_models
from rayllm_app.kuberay.manifest import (
    ACCELERATOR_LABELS,
    DEFAULT_CPU_IMAGE,
    DEFAULT_GPU_IMAGE,
    DEFAULT_HTTP_PORT,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_NAME,
    DEFAULT_ROUTER_REPLICAS,
    RenderError,
    RenderOptions,
    render_rayservice,
)


class _ManifestDumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_ManifestDumper.add_representer(str, _represent_str)


def dump_manifest(manifest: dict[str, Any], header: list[str] | None = None) -> str:
    body = yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, width=1000, allow_unicode=True)
    lines = [f"# {line}".rstrip() for line in header or []]
    return "\n".join(lines + [body]) if lines else body


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, type=Path,
                        help="model YAML file or folder of them (repeatable); embedded inline")
    parser.add_argument("--image", default=None,
                        help=f"container image (default: {DEFAULT_GPU_IMAGE} if any model needs GPUs, "
                             f"else {DEFAULT_CPU_IMAGE})")
    parser.add_argument("--name", default=DEFAULT_NAME, help="RayService name (default: %(default)s)")
    parser.add_argument("--namespace", default=None)
    parser.add_argument("--output", "-o", default=None, help="write here instead of stdout")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="Serve HTTP port (default: 8000)")
    parser.add_argument("--autoscaling", action=argparse.BooleanOptionalAction, default=None,
                        help="KubeRay in-tree autoscaler; worker groups scale between 0 and their maximum "
                             "(default: on when any model needs GPUs)")
    parser.add_argument("--idle-timeout", type=int, default=DEFAULT_IDLE_TIMEOUT_S,
                        help="seconds an idle worker pod lives before the autoscaler removes it")
    parser.add_argument("--s3-secret", default=None,
                        help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (optional: AWS_SESSION_TOKEN, "
                             "AWS_REGION, AWS_ENDPOINT_URL_S3) for s3_mirror_config")
    parser.add_argument("--hf-token-secret", default=None, help="Secret with key HF_TOKEN (gated Hub models)")
    parser.add_argument("--service-account", default=None,
                        help="pods' service account (IRSA on EKS, Workload Identity on GKE)")
    parser.add_argument("--accelerator-label", choices=sorted(ACCELERATOR_LABELS), default="nvidia",
                        help="node label that selects a model's accelerator_type: nvidia = nvidia.com/gpu.product "
                             "(GPU operator), gke = cloud.google.com/gke-accelerator, karpenter = "
                             "karpenter.k8s.aws/instance-gpu-name, none (default: %(default)s)")
    parser.add_argument("--node-selector", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="extra node selector for every worker group (repeatable)")
    parser.add_argument("--worker-memory", default=None,
                        help="memory of every worker pod, e.g. 64Gi (default: 16Gi per GPU + 1Gi per CPU; "
                             "CPU-only pods 1Gi + 2Gi per CPU)")
    parser.add_argument("--head-cpu", default=None, help="head pod CPUs (default: 2 with GPUs, else 1)")
    parser.add_argument("--head-memory", default=None, help="head pod memory (default: 8Gi with GPUs, else 3Gi)")
    parser.add_argument("--revision", default=None,
                        help="annotation on the head pod; a new value makes KubeRay upgrade on a new cluster")
    parser.add_argument("--router-replicas", type=router_replicas_arg, default=None, metavar="N|per-node|MIN-MAX",
                        help=f"router replicas: a count, one per node when deployed, or a range to autoscale in "
                             f"(default: {DEFAULT_ROUTER_REPLICAS})")
    parser.add_argument("--responses-store", default=None, metavar="URL",
                        help="stored Responses shared by every router and replica: a Redis URL for production "
                             "(default: embedded, an SQLite file in the head pod, lost with it)")
    parser.add_argument("--limits-store", default=None, metavar="URL",
                        help="key budgets and usage history: a Redis URL (default: embedded, on the head pod)")
    parser.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=True,
                        help="throughput-optimized Serve behind Ray's HAProxy ingress on every pod (default: on)")


def router_args(args: argparse.Namespace) -> dict[str, object]:
    """The serve config's ``args.router`` from the flags."""
    router: dict[str, object] = dict(args.router_replicas or {"replicas": DEFAULT_ROUTER_REPLICAS})
    if args.responses_store:
        router["responses_store"] = args.responses_store
    if args.limits_store:
        router["limits_store"] = args.limits_store
    return router


def options_from_args(args: argparse.Namespace) -> RenderOptions:
    return RenderOptions(
        name=args.name, namespace=args.namespace, image=args.image, http_port=args.http_port,
        autoscaling=args.autoscaling, idle_timeout_s=args.idle_timeout, s3_secret=args.s3_secret,
        hf_token_secret=args.hf_token_secret, service_account=args.service_account,
        accelerator_label=args.accelerator_label, node_selector=dict(args.node_selector),
        worker_memory=args.worker_memory, head_cpu=args.head_cpu, head_memory=args.head_memory,
        revision=args.revision, fast_path=args.fast_path, router=router_args(args),
    )


def command_line(args: argparse.Namespace) -> str:
    """The canonical `rayllm kuberay render` command for these arguments (non-defaults only)."""
    words = ["rayllm", "kuberay", "render"]
    for path in args.model:
        words += ["--model", str(path)]
    simple = [("--image", args.image, None), ("--name", args.name, DEFAULT_NAME),
              ("--namespace", args.namespace, None), ("--http-port", args.http_port, DEFAULT_HTTP_PORT),
              ("--idle-timeout", args.idle_timeout, DEFAULT_IDLE_TIMEOUT_S),
              ("--s3-secret", args.s3_secret, None), ("--hf-token-secret", args.hf_token_secret, None),
              ("--service-account", args.service_account, None),
              ("--accelerator-label", args.accelerator_label, "nvidia"),
              ("--worker-memory", args.worker_memory, None), ("--head-cpu", args.head_cpu, None),
              ("--head-memory", args.head_memory, None), ("--revision", args.revision, None),
              ("--responses-store", args.responses_store, None), ("--limits-store", args.limits_store, None)]
    for flag, value, default in simple:
        if value != default:
            words += [flag, str(value)]
    if args.autoscaling is not None:
        words.append("--autoscaling" if args.autoscaling else "--no-autoscaling")
    if args.router_replicas is not None:
        words += ["--router-replicas", _replicas_text(args.router_replicas)]
    if not args.fast_path:
        words.append("--no-fast-path")
    for key, value in args.node_selector:
        words += ["--node-selector", f"{key}={value}"]
    if args.output:
        words += ["--output", str(args.output)]
    return shlex.join(words)


def _replicas_text(fields: dict) -> str:
    scaling = fields.get("autoscaling")
    if scaling:
        return f"{scaling['min_replicas']}-{scaling['max_replicas']}"
    return "per-node" if fields["replicas"] == "per_node" else str(fields["replicas"])


def render_from_args(args: argparse.Namespace) -> str:
    """The manifest text `rayllm kuberay render` writes for these arguments."""
    manifest = render_rayservice(list(args.model), options_from_args(args))
    models = ", ".join(m.get("engine_config", {}).get("model_id", "?") for m in manifest_models(manifest))
    header = [
        f"RayService {manifest['metadata']['name']} serving: {models}",
        "Generated by `rayllm kuberay render`; the model configs are embedded in serveConfigV2.",
        "Regenerate (do not edit by hand):",
        f"  {command_line(args)}",
    ]
    return dump_manifest(manifest, header)


def cmd_render(args: argparse.Namespace) -> int:
    try:
        text = render_from_args(args)
    except (ConfigError, RenderError) as error:
        print(error, file=sys.stderr)
        return 2
    if args.output and str(args.output) != "-":
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """`rayllm kuberay render ...` (called from rayllm_app.cli.build_parser)."""
    kuberay = sub.add_parser("kuberay", help="KubeRay (Kubernetes) manifests for model YAMLs")
    commands = kuberay.add_subparsers(dest="kuberay_command", required=True)
    render = commands.add_parser(
        "render", help="write a RayService manifest serving the given model YAMLs",
        description="Write a KubeRay RayService manifest (apiVersion ray.io/v1) serving the given model "
        "YAMLs: the configs embedded in serveConfigV2, worker groups sized from each model's "
        "scaling_config. See kuberay/README.md.")
    add_arguments(render)
    render.set_defaults(func=cmd_render)
