"""engine_kwargs are checked against vLLM's argument names read from its source, so that
``rayllm run`` does not import vLLM (and torch) before Ray starts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from rayllm_app.config.schema import _engine_arg_names_from_source


def test_names_from_source_equal_the_dataclass_fields():
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert _engine_arg_names_from_source() == frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def test_loading_a_model_file_does_not_import_vllm():
    code = ("import sys; from rayllm_app.config import load_model_configs; "
            "load_model_configs(['models/smollm2-135m-instruct.yaml']); "
            "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
