"""Schema of ``engine_config.s3_mirror_config``: load a model from an S3 prefix instead of the Hub.

Credentials are deliberately not fields: they come from the standard AWS chain (environment,
shared profile, instance/IRSA role), so a model YAML never holds a secret. ``s3_sync_args``
exists so RayLLM configs keep working; it is translated into include/exclude filters with
``aws s3 sync`` semantics instead of being passed to a CLI.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# S3 bucket naming rules (lowercase, digits, dots, hyphens; 3-63 characters).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_PATTERN_FLAGS = ("--exclude", "--include")
_SWITCH_FLAGS = ("--no-sign-request",)
ACCEPTED_SYNC_ARGS = "--exclude PATTERN, --include PATTERN, --no-sign-request"

FilterRule = tuple[Literal["include", "exclude"], str]


def parse_s3_uri(uri: str, *, want_object: bool) -> tuple[str, str]:
    """Split ``s3://bucket/rest`` into (bucket, rest), raising ValueError with the expected shape."""
    shape = "s3://bucket/path/to/file" if want_object else "s3://bucket/prefix/"
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an S3 URI; expected the form {shape}")
    bucket, _, rest = uri[len("s3://"):].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(
            f"{bucket!r} in {uri!r} is not a valid S3 bucket name "
            "(3-63 characters: lowercase letters, digits, '.', '-'); expected the form " + shape
        )
    if "\\" in rest or any(part in ("..", ".") for part in rest.split("/")):
        raise ValueError(f"{uri!r} contains '.', '..' or a backslash in its path; write the key literally")
    if want_object and (not rest or rest.endswith("/")):
        raise ValueError(f"{uri!r} names a prefix, not one object; expected the form {shape}")
    return bucket, rest


def parse_sync_args(args: list[str]) -> tuple[list[FilterRule], bool]:
    """Translate ``aws s3 sync`` flags into ordered filter rules and the no-sign-request switch."""
    rules: list[FilterRule] = []
    unsigned = False
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline_value = arg.partition("=")
        if flag in _PATTERN_FLAGS:
            if eq:
                pattern = inline_value
            elif i + 1 < len(args):
                i += 1
                pattern = args[i]
            else:
                raise ValueError(f"s3_sync_args: {flag!r} needs a pattern after it, e.g. [{flag!r}, '*.bin']")
            if not pattern:
                raise ValueError(f"s3_sync_args: {flag!r} has an empty pattern")
            rules.append(("include" if flag == "--include" else "exclude", pattern))
        elif arg in _SWITCH_FLAGS:
            unsigned = True
        elif arg.startswith("-"):
            raise ValueError(
                f"s3_sync_args: unsupported flag {arg!r}; accepted flags are {ACCEPTED_SYNC_ARGS} "
                "(the mirror does not run the AWS CLI, so other flags would be silently meaningless)"
            )
        else:
            raise ValueError(
                f"s3_sync_args: unexpected value {arg!r}; patterns must follow --exclude or --include"
            )
        i += 1
    return rules, unsigned


class ExtraFile(BaseModel):
    """One extra object (e.g. a tokenizer kept elsewhere) copied to a fixed local path."""

    model_config = ConfigDict(extra="forbid")

    bucket_uri: str = Field(description="s3://bucket/path/to/object of exactly one object")
    destination_path: str = Field(description="Absolute path, or a path relative to the model folder")

    @field_validator("bucket_uri")
    @classmethod
    def _object_uri(cls, value: str) -> str:
        parse_s3_uri(value, want_object=True)
        return value

    @field_validator("destination_path")
    @classmethod
    def _safe_destination(cls, value: str) -> str:
        if not value.strip() or value.endswith("/"):
            raise ValueError(f"destination_path {value!r} must name a file, e.g. 'tokenizer.json' or '/data/x.bin'")
        if "\\" in value or ".." in value.split("/"):
            raise ValueError(f"destination_path {value!r} must not contain '..' or backslashes")
        return value


class S3MirrorConfig(BaseModel):
    """Where the model folder lives in S3 and how to reach it (no credentials here, by design)."""

    model_config = ConfigDict(extra="forbid")

    bucket_uri: str = Field(description="s3://bucket/prefix/ holding config.json, tokenizer and weights")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, then AWS"
    )
    region: str | None = Field(None, description="Bucket region; default: the AWS chain (AWS_REGION, profile)")
    extra_files: list[ExtraFile] = Field(default_factory=list)
    anonymous: bool = Field(False, description="Unsigned requests, for public buckets")
    s3_sync_args: list[str] = Field(
        default_factory=list, description="RayLLM compatibility: --exclude/--include PATTERN, --no-sign-request"
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="'path' for S3-compatible servers without virtual-host bucket DNS (MinIO, Ceph)"
    )
    max_concurrency: int = Field(8, ge=1, le=128, description="Parallel HTTP streams per node")
    retry_timeout_s: float = Field(
        20.0, gt=0, le=3600, description="How long to keep retrying an unreachable or failing endpoint"
    )
    verify_checksums: bool = Field(
        True, description="Check single-part ETags as MD5; turn off for servers whose ETags are not MD5"
    )

    @field_validator("bucket_uri")
    @classmethod
    def _prefix_uri(cls, value: str) -> str:
        bucket, prefix = parse_s3_uri(value, want_object=False)
        # A prefix without '/' would also match siblings ("llama" matches "llama-70b/").
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return f"s3://{bucket}/{prefix}"

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"endpoint_url {value!r} must be an http:// or https:// URL, e.g. http://minio:9000")
        return value

    @field_validator("s3_sync_args")
    @classmethod
    def _sync_args(cls, value: list[str]) -> list[str]:
        parse_sync_args(value)
        return value

    @model_validator(mode="after")
    def _apply_no_sign_request(self) -> S3MirrorConfig:
        if parse_sync_args(self.s3_sync_args)[1]:
            self.anonymous = True
        return self

    @property
    def bucket(self) -> str:
        return parse_s3_uri(self.bucket_uri, want_object=False)[0]

    @property
    def prefix(self) -> str:
        return parse_s3_uri(self.bucket_uri, want_object=False)[1]

    @property
    def filters(self) -> list[FilterRule]:
        return parse_sync_args(self.s3_sync_args)[0]

    def includes(self, relative_key: str) -> bool:
        """aws s3 sync semantics: everything is included unless filtered; the last matching filter wins."""
        included = True
        for action, pattern in self.filters:
            if fnmatch.fnmatchcase(relative_key, pattern):
                included = action == "include"
        return included
