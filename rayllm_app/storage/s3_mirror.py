"""Mirror a model folder from an S3 prefix to local disk, once per node, before the engine starts.

Layout (the Hugging Face cache layout, so the folder looks like any downloaded model)::

    <cache>/models--<org>--<name>/
        snapshots/<rev>/        the model folder handed to vLLM; only complete, verified files
        refs/main               <rev> of the last complete mirror (used if S3 is unreachable later)
        .rayllm/<rev>.json      manifest, written once every file of <rev> is in place
        .locks/<rev>.lock       one download per node at a time; other callers wait for it

``<cache>`` is the ``cache_dir`` argument, else ``$RAYLLM_CACHE_DIR/s3``, else ``~/.cache/rayllm/s3``.
``<rev>`` is the first 40 hex digits of a SHA-256 over the filtered listing (relative key, ETag,
size) and the extra files, so an unchanged bucket maps to the same folder (nothing downloaded)
and a changed one to a new folder. A file appears under its final name only after it was
fetched completely, fsynced and checked (size; MD5 for single-part ETags), via ``os.replace``
from a hidden ``.<name>.s3-partial`` temp file; so after an interruption the files already in
``snapshots/<rev>/`` are complete and are not fetched again. Unchanged files of an older
snapshot are hard-linked instead of downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from rayllm_app.config.s3_config import S3MirrorConfig
from rayllm_app.storage.s3_transfer import (
    Progress,
    RemoteFile,
    S3Client,
    S3MirrorError,
    Transfer,
)

__all__ = ["MirrorStats", "S3MirrorError", "default_cache_dir", "mirror_model", "mirror_model_with_stats",
           "mirror_on_placement_group_nodes"]

log = logging.getLogger("rayllm_app.storage.s3_mirror")
_UNSAFE_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class MirrorStats:
    """What one mirror call did; ``downloaded_bytes == 0`` means the node already had the model."""

    path: Path
    rev: str
    files: int
    downloaded_files: int
    downloaded_bytes: int
    linked_files: int
    requests: int  # GET requests made; more than downloaded_files means files were split into ranges
    seconds: float


@dataclass
class _Plan:
    rev: str
    repo: Path
    files: list[RemoteFile]

    @property
    def snapshot(self) -> Path:
        return self.repo / "snapshots" / self.rev

    @property
    def manifest(self) -> Path:
        return self.repo / ".rayllm" / f"{self.rev}.json"


def default_cache_dir() -> Path:
    root = os.environ.get("RAYLLM_CACHE_DIR")
    return Path(root) / "s3" if root else Path.home() / ".cache" / "rayllm" / "s3"


def _repo_dir(cache_dir: Path | None, model_id: str) -> Path:
    name = "--".join(re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in model_id.strip("/").split("/"))
    return Path(cache_dir or default_cache_dir()).expanduser() / f"models--{name}"


def _check_relative_key(relative: str, uri: str) -> None:
    """Refuse keys that would land outside (or alias paths inside) the model folder."""
    parts = relative.split("/")
    if ("\\" in relative or "\x00" in relative or relative.startswith("/") or _UNSAFE_DRIVE.match(relative)
            or any(part in ("", ".", "..") for part in parts)):
        raise S3MirrorError(
            "unsafe_key",
            f"refusing to mirror {uri}: its name {relative!r} would escape or alias the model folder "
            "(absolute path, '..', '.', empty segment or backslash). Rename or delete that object, or "
            "skip it with s3_sync_args: ['--exclude', '<pattern>']",
        )


def _list_prefix(s3: S3Client, config: S3MirrorConfig) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"Bucket": config.bucket, "Prefix": config.prefix}
    while True:
        page = s3.call(f"listing {config.bucket_uri}", "list_objects_v2", **kwargs)
        objects.extend(page.get("Contents", []))
        if not page.get("IsTruncated"):
            return objects
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


# The file that makes a prefix a folder of its kind: a model's, or a LoRA adapter's (ADAPTER_MARKER).
MODEL_MARKER = ("config.json", "a Hugging Face model folder")
ADAPTER_MARKER = ("adapter_config.json", "a PEFT LoRA adapter folder")


def _model_files(s3: S3Client, config: S3MirrorConfig, marker: tuple[str, str] = MODEL_MARKER
                 ) -> list[tuple[str, dict[str, Any]]]:
    """(path relative to the prefix, listing entry) of every included object; checks the folder shape."""
    listed = [(obj["Key"][len(config.prefix):], obj) for obj in _list_prefix(s3, config)]
    listed = [(rel, obj) for rel, obj in listed if rel and not rel.endswith("/")]  # skip "folder" markers
    if not listed:
        raise S3MirrorError("empty_prefix", f"no objects under {config.bucket_uri}: check the prefix (it is "
                            "case-sensitive) and that the upload finished, e.g. `aws s3 ls "
                            f"{config.bucket_uri}`")
    included = [(rel, obj) for rel, obj in listed if config.includes(rel)]
    if not included:
        raise S3MirrorError("empty_prefix", f"all {len(listed)} objects under {config.bucket_uri} are "
                            f"excluded by s3_sync_args {config.s3_sync_args}; loosen the filters")
    for rel, obj in included:
        _check_relative_key(rel, f"s3://{config.bucket}/{obj['Key']}")
    name, kind = marker
    if not any(rel == name for rel, _ in included):
        nested = sorted(rel for rel, _ in included if rel.endswith("/" + name))
        hint = (f"; found {nested[0]}, so bucket_uri should probably be "
                f"{config.bucket_uri}{nested[0].rpartition('/')[0]}/") if nested else ""
        sample = ", ".join(rel for rel, _ in included[:5])
        raise S3MirrorError("no_config", f"no {name} directly under {config.bucket_uri} (found: {sample}"
                            f"{', ...' if len(included) > 5 else ''}){hint}. bucket_uri must point at {kind}")
    return included


def _plan(s3: S3Client, config: S3MirrorConfig, repo: Path, marker: tuple[str, str] = MODEL_MARKER) -> _Plan:
    model = [(rel, obj["Key"], int(obj["Size"]), obj["ETag"].strip('"'))
             for rel, obj in _model_files(s3, config, marker)]
    extras = []
    for extra in config.extra_files:
        bucket, _, key = extra.bucket_uri[len("s3://"):].partition("/")
        head = s3.call(f"reading {extra.bucket_uri} (extra_files)", "head_object", Bucket=bucket, Key=key)
        extras.append((extra.destination_path, bucket, key, int(head["ContentLength"]), head["ETag"].strip('"')))
    digest = hashlib.sha256()
    for row in sorted(model) + sorted(extras):
        digest.update("\t".join(map(str, row)).encode() + b"\n")
    plan = _Plan(digest.hexdigest()[:40], repo, [])
    plan.files = [RemoteFile(config.bucket, key, size, etag, plan.snapshot / rel) for rel, key, size, etag in model]
    plan.files += [RemoteFile(bucket, key, size, etag, plan.snapshot / dest)  # absolute dest wins the join
                   for dest, bucket, key, size, etag in extras]
    _check_collisions(plan.files)
    plan.files.sort(key=lambda f: -f.size)  # biggest first: the splitter balances the tail
    return plan


def _check_collisions(files: list[RemoteFile]) -> None:
    paths = {str(f.dest): f for f in files}
    if len(paths) != len(files):
        raise S3MirrorError("collision", "two objects (or an extra_files entry and an object) map to the same "
                            "local file; give extra_files a distinct destination_path")
    for f in files:
        for parent in f.dest.parents:
            if str(parent) in paths:
                raise S3MirrorError("collision", f"{paths[str(parent)].uri} is a file but {f.uri} needs a "
                                    f"folder of that name ({parent}); remove one of them")


def _present(f: RemoteFile, plan: _Plan) -> bool:
    """Files inside the snapshot are complete by construction; outside it only a manifest vouches."""
    inside = plan.snapshot in f.dest.parents
    try:
        return (inside or plan.manifest.exists()) and f.dest.stat().st_size == f.size
    except OSError:
        return False


def _is_complete(plan: _Plan) -> bool:
    return plan.manifest.exists() and all(_present(f, plan) for f in plan.files)


def _link_from_older_snapshots(plan: _Plan, missing: list[RemoteFile]) -> list[RemoteFile]:
    """Hard-link unchanged files (same ETag and size) from complete older snapshots; return the rest."""
    known: dict[tuple[str, int], Path] = {}
    snapshots = plan.repo / "snapshots"
    for manifest in (plan.repo / ".rayllm").glob("*.json"):
        try:
            entries = json.loads(manifest.read_text())["files"] if manifest != plan.manifest else []
        except (OSError, ValueError, KeyError):
            continue  # a damaged manifest only costs a download
        for entry in entries:
            if snapshots in Path(entry["path"]).parents:  # not extra files kept elsewhere
                known[(entry["etag"], entry["size"])] = Path(entry["path"])
    still_missing = []
    for f in missing:
        source = known.get((f.etag, f.size))
        try:
            if source is None or source.stat().st_size != f.size or plan.snapshot not in f.dest.parents:
                raise FileNotFoundError(f.dest)
            f.dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, f.dest)
        except OSError:
            still_missing.append(f)
    return still_missing


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)


def _fsync_dirs(files: list[RemoteFile]) -> None:
    """Make the renames durable: a crash right after must not lose a file the manifest lists."""
    for folder in {f.dest.parent for f in files}:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _offline_fallback(repo: Path, error: S3MirrorError) -> Path | None:
    """The last complete snapshot, if S3 is unreachable: a restart should not need the bucket."""
    try:
        rev = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / rev
    if not (repo / ".rayllm" / f"{rev}.json").exists() or not snapshot.is_dir():
        return None
    log.warning("%s; using the last complete mirror %s instead", error, snapshot)
    return snapshot


def _download(s3: S3Client, config: S3MirrorConfig, plan: _Plan, label: str) -> tuple[int, int, int, int]:
    """Fetch what is missing (caller holds the lock); return (files, bytes, linked files, requests)."""
    missing = [f for f in plan.files if not _present(f, plan)]
    to_fetch = _link_from_older_snapshots(plan, missing)
    total = sum(f.size for f in to_fetch)
    log.info("%s: fetching %d files (%.1f MiB) from %s; %d already present, %d linked from an older snapshot",
             label, len(to_fetch), total / 2**20, config.bucket_uri, len(plan.files) - len(missing),
             len(missing) - len(to_fetch))
    transfer = Transfer(s3, to_fetch, Progress(label, total, len(to_fetch)), config.max_concurrency)
    with transfer.progress:
        transfer.run()
    _fsync_dirs(plan.files)
    manifest = {"rev": plan.rev, "bucket_uri": config.bucket_uri, "completed_at": time.time(),
                "files": [{"uri": f.uri, "path": str(f.dest), "size": f.size, "etag": f.etag} for f in plan.files]}
    _write_atomically(plan.manifest, json.dumps(manifest, indent=1))
    _write_atomically(plan.repo / "refs" / "main", plan.rev)
    if to_fetch:
        log.info("%s in %.1f s", transfer.progress.line(), time.monotonic() - transfer.progress.started)
    return len(to_fetch), total, len(missing) - len(to_fetch), transfer.requests


def mirror_model_with_stats(config: S3MirrorConfig, model_id: str, cache_dir: Path | None = None,
                            marker: tuple[str, str] = MODEL_MARKER) -> MirrorStats:
    """Like :func:`mirror_model`, and also tell what was downloaded (for tests, benchmarks, logs)."""
    started = time.monotonic()
    repo = _repo_dir(cache_dir, model_id)
    label = f"s3 mirror {model_id}"
    s3 = S3Client(config, pool_size=config.max_concurrency + 2)
    try:
        plan = _plan(s3, config, repo, marker)
    except S3MirrorError as exc:
        fallback = _offline_fallback(repo, exc) if exc.reason == "unreachable" else None
        if fallback is None:
            raise
        return MirrorStats(fallback, fallback.name, 0, 0, 0, 0, 0, time.monotonic() - started)

    def stats(downloaded: int = 0, nbytes: int = 0, linked: int = 0, requests: int = 0) -> MirrorStats:
        return MirrorStats(plan.snapshot, plan.rev, len(plan.files), downloaded, nbytes, linked, requests,
                           time.monotonic() - started)

    if _is_complete(plan):
        log.info("%s: %s is complete, nothing to download", label, plan.snapshot)
        return stats()
    lock = FileLock(repo / ".locks" / f"{plan.rev}.lock")
    (repo / ".locks").mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=1)
    except Timeout:
        log.info("%s: another process on this node is downloading %s; waiting for it", label, plan.rev)
        lock.acquire()
    try:
        if _is_complete(plan):  # the other process finished it while we waited
            return stats()
        return stats(*_download(s3, config, plan, label))
    finally:
        lock.release()


def mirror_model(config: S3MirrorConfig, model_id: str, cache_dir: Path | None = None,
                 marker: tuple[str, str] = MODEL_MARKER) -> Path:
    """Make sure the S3 prefix is complete on this node; return the folder to load as the model
    (or, with ADAPTER_MARKER, as a LoRA adapter)."""
    return mirror_model_with_stats(config, model_id, cache_dir, marker).path


def _mirror_task(config: S3MirrorConfig, model_id: str, cache_dir: str | None) -> tuple[str, str, str, str]:
    """Ray task body: (node, path, error reason, error message), so errors come back unwrapped."""
    node = socket.gethostname()
    try:
        return node, str(mirror_model(config, model_id, Path(cache_dir) if cache_dir else None)), "", ""
    except S3MirrorError as exc:
        return node, "", exc.reason, str(exc)


def mirror_on_placement_group_nodes(
    config: S3MirrorConfig, model_id: str, placement_group: Any, cache_dir: Path | None = None
) -> Path:
    """Run :func:`mirror_model` once on every node holding a bundle of ``placement_group``.

    Tensor/pipeline-parallel workers on other nodes open the same path, so each node needs its own
    copy. One zero-CPU task per distinct node; nodes that are complete download nothing.
    """
    import ray
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.get(placement_group.ready())
    first_bundle: dict[str, int] = {}
    for index, node_id in sorted(placement_group_table(placement_group)["bundles_to_node_id"].items()):
        first_bundle.setdefault(node_id, int(index))
    task = ray.remote(num_cpus=0, max_retries=0)(_mirror_task)
    refs = [
        task.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=index)).remote(
            config, model_id, str(cache_dir) if cache_dir else None)
        for index in sorted(first_bundle.values())
    ]
    results = ray.get(refs)
    errors = [(reason, f"on node {node}: {error}") for node, _, reason, error in results if reason]
    if errors:
        raise S3MirrorError(errors[0][0], "; ".join(message for _, message in errors))
    paths = {path for _, path, _, _ in results}
    if len(paths) != 1:
        raise S3MirrorError("cache_mismatch", f"nodes mirrored {model_id} to different folders {sorted(paths)}; "
                            "set RAYLLM_CACHE_DIR to the same path on every node")
    return Path(paths.pop())
