"""Render a KubeRay ``RayService`` manifest (apiVersion ray.io/v1) from model YAMLs.

``rayllm kuberay render --model models/a.yaml [--model ...] [--image ...] [-o FILE]``

The manifest is self-contained: every model config is embedded inline in
``spec.serveConfigV2`` (as the ``args.models`` list of ``rayllm_app.app:build_app``), so
the image needs the package but no YAML files. Worker groups are sized from each
model's worker group, exactly as ``placement_bundles()`` reserves it on Ray:

* STRICT_PACK / PACK: all bundles of a replica land on one node, so one pod must hold
  their sum (GPUs per pod = num_gpus_per_worker x num_workers, plus the CPUs of the
  replica and of every worker);
* SPREAD / STRICT_SPREAD: one pod per bundle, sized for the largest bundle.

Models whose pods have the same shape share a worker group. ``accelerator_type`` becomes
the Ray resource ``accelerator_type:<X>`` in the group's ``rayStartParams`` (so Ray, and
the autoscaler when it scales a group up from zero, know what the pod carries) and a
Kubernetes node selector for the GPU product (label scheme chosen with
``--accelerator-label``). The head starts with ``num-cpus: "0"`` so no replica lands on
it. With autoscaling (default when any model needs GPUs) KubeRay's in-tree autoscaler
runs and every worker group starts at, and may shrink to, 0 pods.

Modules: ``manifest`` builds the manifest, ``groups`` sizes the worker groups and checks
that a manifest's groups hold its models, ``cli`` is the command. This package is their
public API.
"""

from __future__ import annotations

from rayllm_app.kuberay.cli import add_cli, dump_manifest, render_from_args
from rayllm_app.kuberay.groups import (
    check_worker_groups,
    format_resources_param,
    manifest_models,
    parse_quantity,
    parse_resources_param,
)
from rayllm_app.kuberay.manifest import (
    ACCELERATOR_LABELS,
    RenderError,
    RenderOptions,
    ray_version,
    render_rayservice,
)

__all__ = [
    "ACCELERATOR_LABELS",
    "RenderError",
    "RenderOptions",
    "add_cli",
    "check_worker_groups",
    "dump_manifest",
    "format_resources_param",
    "manifest_models",
    "parse_quantity",
    "parse_resources_param",
    "ray_version",
    "render_from_args",
    "render_rayservice",
]
