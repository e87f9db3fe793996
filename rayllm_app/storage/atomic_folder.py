"""Write a folder next to its final place and swap it in only when it is complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(target: Path, prefix: str) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``target`` in one rename.

    An interrupted build leaves no half-written ``target`` behind, so "the folder exists"
    always means "the folder is complete".
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
