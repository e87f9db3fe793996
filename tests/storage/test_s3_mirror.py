"""The S3 model mirror against a real S3 API (moto's server in a subprocess on 127.0.0.1).

boto3 is never mocked: every request goes over HTTP to the server. Only the mirror's own
``_write_at`` is slowed down in the interruption test, so the kill lands mid-download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from rayllm_app.config.s3_config import S3MirrorConfig  # noqa: E402
from rayllm_app.storage import s3_transfer  # noqa: E402
from rayllm_app.storage.s3_mirror import (  # noqa: E402
    S3MirrorError,
    mirror_model,
    mirror_model_with_stats,
)
from tests.s3_server import FAKE_CREDENTIALS, MotoS3Server, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "acme/tiny-llama"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Fake credentials in the environment, and nothing from the developer's own AWS setup."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MotoS3Server(log_path=tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield srv
    srv.kill()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from rayllm_app.storage.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def bucket(server) -> str:
    name = f"models-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    return name


def config_for(server: MotoS3Server, bucket: str, prefix: str = "llama/", **overrides) -> S3MirrorConfig:
    overrides.setdefault("endpoint_url", server.url)
    overrides.setdefault("retry_timeout_s", 2)
    return S3MirrorConfig(bucket_uri=f"s3://{bucket}/{prefix}", **overrides)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def put(server: MotoS3Server, bucket: str, files: dict[str, bytes]) -> None:
    s3 = server.client()
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def test_mirror_tiny_model_is_identical_loads_and_second_call_downloads_nothing(server, bucket, tiny_model, tmp_path):
    from transformers import AutoConfig

    server.upload_folder(tiny_model, bucket, "llama/", create=False)
    first = mirror_model_with_stats(config_for(server, bucket), MODEL_ID, tmp_path / "cache")

    assert first.path == tmp_path / "cache" / "models--acme--tiny-llama" / "snapshots" / first.rev
    assert tree(first.path) == tree(tiny_model)
    assert AutoConfig.from_pretrained(first.path).model_type == "llama"
    assert first.downloaded_files == first.files == len(tree(tiny_model))
    assert (first.path.parents[1] / "refs" / "main").read_text() == first.rev

    before = {p.name: p.stat() for p in first.path.iterdir()}
    second = mirror_model_with_stats(config_for(server, bucket), MODEL_ID, tmp_path / "cache")
    assert (second.path, second.downloaded_files, second.downloaded_bytes, second.requests) == (first.path, 0, 0, 0)
    after = {p.name: p.stat() for p in second.path.iterdir()}
    assert {k: (s.st_ino, s.st_mtime_ns) for k, s in before.items()} == {
        k: (s.st_ino, s.st_mtime_ns) for k, s in after.items()}


def test_changed_bucket_gets_a_new_snapshot_and_links_unchanged_files(server, bucket, tmp_path):
    put(server, bucket, {"llama/config.json": b'{"v": 1}', "llama/model.safetensors": b"w" * 4096})
    old = mirror_model_with_stats(config_for(server, bucket), MODEL_ID, tmp_path)
    put(server, bucket, {"llama/config.json": b'{"v": 2}'})
    new = mirror_model_with_stats(config_for(server, bucket), MODEL_ID, tmp_path)
    assert new.rev != old.rev and (new.downloaded_files, new.linked_files) == (1, 1)
    assert (new.path / "config.json").read_bytes() == b'{"v": 2}'
    assert (old.path / "config.json").read_bytes() == b'{"v": 1}'
    assert (new.path / "model.safetensors").stat().st_ino == (old.path / "model.safetensors").stat().st_ino


def test_large_objects_download_in_parallel_ranges_with_few_log_lines(server, bucket, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(s3_transfer, "MIN_SPLIT_BYTES", 8 << 20)  # split these 64 MiB like 512 MiB shards
    multipart = os.urandom(64 << 20)  # uploaded in 8 MiB parts: multipart ETag, size is checked
    single = os.urandom(24 << 20)  # one PUT: ETag is the MD5, checked after the ranged download
    put(server, bucket, {"llama/config.json": b'{"model_type": "llama"}', "llama/single.bin": single})
    source = tmp_path / "multipart.bin"
    source.write_bytes(multipart)
    server.client().upload_file(str(source), bucket, "llama/model-00001.safetensors")

    with caplog.at_level(logging.INFO, logger="rayllm_app.storage.s3_mirror"):
        stats = mirror_model_with_stats(config_for(server, bucket, max_concurrency=4), MODEL_ID, tmp_path / "c")

    assert sha256(stats.path / "model-00001.safetensors") == hashlib.sha256(multipart).hexdigest()
    assert sha256(stats.path / "single.bin") == hashlib.sha256(single).hexdigest()
    assert stats.requests > stats.downloaded_files == 3  # at least one file was split into byte ranges
    mirror_lines = [r for r in caplog.records if r.name == "rayllm_app.storage.s3_mirror"]
    assert 1 <= len(mirror_lines) <= 6, [r.getMessage() for r in mirror_lines]
    assert "MB/s" in mirror_lines[-1].getMessage()


def test_server_killed_mid_download_leaves_no_partial_file_and_rerun_completes(tmp_path, monkeypatch):
    server = MotoS3Server(log_path=tmp_path / "moto.log").start()
    big = os.urandom(48 << 20)
    (tmp_path / "big.bin").write_bytes(big)

    def upload() -> None:
        server.client().create_bucket(Bucket="interrupted")
        put(server, "interrupted", {"llama/config.json": b"{}", "llama/tokenizer.json": b"{\"v\": 1}"})
        server.client().upload_file(str(tmp_path / "big.bin"), "interrupted", "llama/model.safetensors")

    real_write = s3_transfer._write_at

    def slow_write(fd: int, data: bytes, offset: int) -> None:  # ~10 MiB/s per stream: kill lands mid-file
        time.sleep(0.1)
        real_write(fd, data, offset)

    upload()
    config = config_for(server, "interrupted", max_concurrency=2, retry_timeout_s=1)
    cache = tmp_path / "cache"
    monkeypatch.setattr(s3_transfer, "_write_at", slow_write)
    outcome: dict[str, object] = {}
    worker = threading.Thread(target=lambda: outcome.update(result=_capture(mirror_model, config, MODEL_ID, cache)))
    worker.start()
    partial = _wait_for(lambda: next(cache.rglob(".model.safetensors.s3-partial"), None))
    _wait_for(lambda: partial.stat().st_size and (partial.parent / "config.json").exists())
    server.kill()
    final = partial.parent / "model.safetensors"
    seen_partial_only = []
    while worker.is_alive():  # while the mirror retries, only the temp file may exist
        seen_partial_only.append(not final.exists())
        time.sleep(0.02)
    worker.join()

    error = outcome["result"]
    assert isinstance(error, S3MirrorError) and error.reason == "unreachable", error
    assert server.url in str(error) and "retry_timeout_s" in str(error)
    assert all(seen_partial_only) and not final.exists() and not partial.exists()
    config_stat = (partial.parent / "config.json").stat()

    monkeypatch.setattr(s3_transfer, "_write_at", real_write)
    server.start()  # same port, empty state: upload the same bytes again
    upload()
    stats = mirror_model_with_stats(config, MODEL_ID, cache)
    server.kill()
    assert stats.path == partial.parent
    assert sha256(final) == hashlib.sha256(big).hexdigest()
    assert stats.downloaded_files < stats.files  # finished files were not fetched again
    assert (partial.parent / "config.json").stat().st_ino == config_stat.st_ino


def _capture(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - returned to the test thread
        return exc


def _wait_for(predicate, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the download to start")


@pytest.mark.parametrize("bad_key", ["llama/../evil.json", "llama//etc/passwd", "llama/sub\\..\\evil"])
def test_keys_escaping_the_model_folder_are_refused(server, bucket, tmp_path, bad_key):
    put(server, bucket, {"llama/config.json": b"{}", bad_key: b"pwned"})
    with pytest.raises(S3MirrorError, match="refusing to mirror") as info:
        mirror_model(config_for(server, bucket), MODEL_ID, tmp_path / "cache")
    assert info.value.reason == "unsafe_key" and "--exclude" in str(info.value)
    assert not [p for p in tmp_path.rglob("*") if "evil" in p.name or p.name == "passwd"]
    # The documented way out: exclude the offending object.
    pattern = bad_key[len("llama/"):]
    path = mirror_model(config_for(server, bucket, s3_sync_args=["--exclude", pattern]), MODEL_ID, tmp_path / "c2")
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]


def test_rejected_credentials_give_a_clear_error_without_secrets(server, bucket, tmp_path, monkeypatch, caplog):
    """moto checks SigV4 signatures and IAM policies once authentication is switched on."""
    put(server, bucket, {"llama/config.json": b"{}"})
    iam = server.client("iam")
    iam.create_user(UserName="loader")
    key = iam.create_access_key(UserName="loader")["AccessKey"]
    # Real S3 authorizes ListObjectsV2 by s3:ListBucket. moto 5.2.6 checks the operation's own name
    # (s3:ListObjectsV2) instead, so the policy grants both: the test holds for either version.
    iam.put_user_policy(UserName="loader", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:ListObjectsV2", "s3:GetObject"],
                       "Resource": "*"}]}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    server.enforce_auth(True)
    try:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        mirrored = mirror_model(config_for(server, bucket), MODEL_ID, tmp_path / "ok")
        assert (mirrored / "config.json").exists()

        wrong_secret = "wrong-secret-" + uuid.uuid4().hex
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        with caplog.at_level(logging.DEBUG, logger="rayllm_app"), pytest.raises(S3MirrorError) as info:
            mirror_model(config_for(server, bucket), MODEL_ID, tmp_path / "bad")
        message = str(info.value)
        assert info.value.reason == "access_denied" and "SignatureDoesNotMatch" in message
        assert "AWS_ACCESS_KEY_ID" in message and "anonymous: true" in message
        for secret in (wrong_secret, key["SecretAccessKey"], key["AccessKeyId"]):
            assert secret not in message and secret not in caplog.text

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        with pytest.raises(S3MirrorError, match="InvalidAccessKeyId") as info:
            mirror_model(config_for(server, bucket), MODEL_ID, tmp_path / "bad")
        assert info.value.reason == "access_denied"
    finally:
        server.enforce_auth(False)


def test_missing_credentials_are_reported_before_any_request(server, bucket, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(S3MirrorError, match="no AWS credentials found.*anonymous: true"):
        mirror_model(config_for(server, bucket), MODEL_ID, tmp_path)


def test_anonymous_access_sends_unsigned_requests(server, bucket, tmp_path, monkeypatch):
    """moto serves unsigned GETs only for public-read objects, like S3 does."""
    put(server, bucket, {"llama/config.json": b"{}"})
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    config = config_for(server, bucket, s3_sync_args=["--no-sign-request"])
    assert config.anonymous
    with pytest.raises(S3MirrorError, match="access denied") as info:
        mirror_model(config, MODEL_ID, tmp_path)
    assert info.value.reason == "access_denied"
    server.client().put_object_acl(Bucket=bucket, Key="llama/config.json", ACL="public-read")
    assert (mirror_model(config, MODEL_ID, tmp_path) / "config.json").read_bytes() == b"{}"


@pytest.mark.parametrize(
    ("objects", "uri_prefix", "reason", "text"),
    [
        (None, "llama/", "no_such_bucket", "does not exist"),
        ({}, "llama/", "empty_prefix", "no objects under"),
        ({"llama/README.md": b"x"}, "llama/", "no_config", "no config.json directly under"),
        ({"llama/v1/config.json": b"{}"}, "llama/", "no_config", "bucket_uri should probably be s3://"),
    ],
)
def test_bucket_and_prefix_problems_are_explained(server, bucket, tmp_path, objects, uri_prefix, reason, text):
    if objects is None:
        bucket = "no-such-bucket-" + uuid.uuid4().hex[:8]
    else:
        put(server, bucket, objects)
    with pytest.raises(S3MirrorError, match=text) as info:
        mirror_model(config_for(server, bucket, uri_prefix), MODEL_ID, tmp_path)
    assert info.value.reason == reason
    assert not (tmp_path / "models--acme--tiny-llama" / "snapshots").exists()


def test_everything_excluded_says_so(server, bucket, tmp_path):
    put(server, bucket, {"llama/config.json": b"{}"})
    with pytest.raises(S3MirrorError, match="excluded by s3_sync_args"):
        mirror_model(config_for(server, bucket, s3_sync_args=["--exclude", "*"]), MODEL_ID, tmp_path)


def test_unreachable_endpoint_fails_fast_with_a_bounded_retry(tmp_path):
    config = S3MirrorConfig(bucket_uri="s3://models/llama/", endpoint_url=f"http://127.0.0.1:{free_port()}",
                            retry_timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(S3MirrorError, match="cannot reach S3 at endpoint http://127.0.0.1") as info:
        mirror_model(config, MODEL_ID, tmp_path)
    assert info.value.reason == "unreachable"
    assert 0.1 < time.monotonic() - started < 10


def test_unreachable_endpoint_falls_back_to_the_last_complete_mirror(server, bucket, tmp_path, caplog):
    put(server, bucket, {"llama/config.json": b"{}", "llama/empty.txt": b""})
    path = mirror_model(config_for(server, bucket), MODEL_ID, tmp_path)
    assert (path / "empty.txt").read_bytes() == b""
    offline = config_for(server, bucket, endpoint_url=f"http://127.0.0.1:{free_port()}", retry_timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="rayllm_app.storage.s3_mirror"):
        assert mirror_model(offline, MODEL_ID, tmp_path) == path
    assert "using the last complete mirror" in caplog.text


def test_sync_filters_and_extra_files_land_where_configured(server, bucket, tmp_path):
    put(server, bucket, {
        "llama/config.json": b"{}",
        "llama/model.safetensors": b"weights",
        "llama/original/consolidated.pth": b"unused duplicate weights",
        "llama/original/params.json": b"{}",
        "llama/notes.txt": b"skip me",
    })
    other = f"assets-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=other)
    put(server, other, {"tok/special_tokens.json": b'{"eos": 2}', "lora/adapter.bin": b"adapter"})
    absolute = tmp_path / "adapters" / "adapter.bin"
    config = config_for(
        server, bucket,
        s3_sync_args=["--exclude", "original/*", "--include", "original/params.json", "--exclude=*.txt"],
        extra_files=[
            {"bucket_uri": f"s3://{other}/tok/special_tokens.json", "destination_path": "extra/special_tokens.json"},
            {"bucket_uri": f"s3://{other}/lora/adapter.bin", "destination_path": str(absolute)},
        ],
    )
    stats = mirror_model_with_stats(config, MODEL_ID, tmp_path / "cache")
    assert sorted(tree(stats.path)) == ["config.json", "extra/special_tokens.json", "model.safetensors",
                                        "original/params.json"]
    assert (stats.path / "extra" / "special_tokens.json").read_bytes() == b'{"eos": 2}'
    assert absolute.read_bytes() == b"adapter"
    assert mirror_model_with_stats(config, MODEL_ID, tmp_path / "cache").downloaded_files == 0


def test_sync_args_translation_and_validation_messages():
    def config(*args: str) -> S3MirrorConfig:
        return S3MirrorConfig(bucket_uri="s3://models/llama", s3_sync_args=list(args))

    filters = config("--exclude", "*", "--include", "*.json", "--include=*.safetensors", "--exclude", "big*")
    assert filters.bucket_uri == "s3://models/llama/" and filters.prefix == "llama/"
    assert filters.filters == [("exclude", "*"), ("include", "*.json"), ("include", "*.safetensors"),
                               ("exclude", "big*")]
    included = [k for k in ["config.json", "a/b.json", "model.safetensors", "big.safetensors", "x.bin"]
                if filters.includes(k)]
    assert included == ["config.json", "a/b.json", "model.safetensors"]  # later filters win
    assert config().includes("anything/at/all") and not config().anonymous
    assert config("--no-sign-request").anonymous

    with pytest.raises(ValidationError, match="unsupported flag '--delete'; accepted flags are --exclude "
                                              "PATTERN, --include PATTERN, --no-sign-request"):
        config("--delete")
    with pytest.raises(ValidationError, match="'--exclude' needs a pattern"):
        config("--exclude")
    with pytest.raises(ValidationError, match="unexpected value 'foo'"):
        config("foo")
    with pytest.raises(ValidationError, match="expected the form s3://bucket/prefix/"):
        S3MirrorConfig(bucket_uri="https://models/llama/")
    with pytest.raises(ValidationError, match="not a valid S3 bucket name"):
        S3MirrorConfig(bucket_uri="s3://Models_Bad/llama/")
    with pytest.raises(ValidationError, match="names a prefix, not one object"):
        S3MirrorConfig(bucket_uri="s3://models/l/", extra_files=[{"bucket_uri": "s3://x-b/d/", "destination_path": "a"}])
    with pytest.raises(ValidationError, match="must not contain '..'"):
        S3MirrorConfig(bucket_uri="s3://models/l/", extra_files=[{"bucket_uri": "s3://xb/a", "destination_path": "../a"}])
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        S3MirrorConfig(bucket_uri="s3://models/l/", aws_secret_access_key="nope")


_CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from rayllm_app.config.s3_config import S3MirrorConfig
    from rayllm_app.storage.s3_mirror import mirror_model_with_stats
    config = S3MirrorConfig.model_validate_json({config!r})
    Path(sys.argv[1] + ".ready").touch()
    while not Path({go!r}).exists():
        time.sleep(0.005)
    stats = mirror_model_with_stats(config, "acme/tiny-llama", Path({cache!r}))
    print(json.dumps({{"bytes": stats.downloaded_bytes, "files": stats.downloaded_files, "path": str(stats.path)}}))
""")


def test_two_processes_on_one_node_download_once(server, bucket, tmp_path):
    big = os.urandom(32 << 20)
    put(server, bucket, {"llama/config.json": b"{}", "llama/model.safetensors": big})
    config = config_for(server, bucket, max_concurrency=2)
    script = _CHILD.format(root=str(ROOT), config=config.model_dump_json(), go=str(tmp_path / "go"),
                           cache=str(tmp_path / "cache"))
    env = dict(os.environ)
    children = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"child{i}")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    _wait_for(lambda: all((tmp_path / f"child{i}.ready").exists() for i in range(2)), timeout_s=60)
    (tmp_path / "go").touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["bytes"] for r in results) == [0, len(big) + 2]
    assert sha256(Path(results[0]["path"]) / "model.safetensors") == hashlib.sha256(big).hexdigest()


def test_mirror_on_placement_group_nodes_runs_on_the_bundle_node(server, bucket, tmp_path):
    """Runs in a child process with a Ray cluster of its own (the e2e session may hold one here)."""
    pytest.importorskip("ray")
    put(server, bucket, {"llama/config.json": b"{}", "llama/model.safetensors": b"w" * 1000, "docs/README.md": b"x"})
    script = f"""
import sys
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from rayllm_app.config.s3_config import S3MirrorConfig
from rayllm_app.storage.s3_mirror import S3MirrorError, mirror_on_placement_group_nodes

def config(prefix):
    return S3MirrorConfig(bucket_uri="s3://{bucket}/" + prefix, endpoint_url="{server.url}", retry_timeout_s=2)

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
group = placement_group([{{"CPU": 1}}])
path = mirror_on_placement_group_nodes(config("llama/"), "{MODEL_ID}", group, r"{tmp_path / 'cache'}")
assert (path / "model.safetensors").read_bytes() == b"w" * 1000
try:
    mirror_on_placement_group_nodes(config("docs/"), "{MODEL_ID}", group, r"{tmp_path}")
    sys.exit("expected an S3MirrorError")
except S3MirrorError as error:
    assert error.reason == "no_config" and "on node" in str(error) and "no config.json" in str(error), error
remove_placement_group(group)
ray.shutdown()
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
               AWS_ACCESS_KEY_ID=FAKE_CREDENTIALS["aws_access_key_id"],
               AWS_SECRET_ACCESS_KEY=FAKE_CREDENTIALS["aws_secret_access_key"])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]