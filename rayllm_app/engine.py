"""Deprecated import path: the engine adapter lives in :mod:`rayllm_app.replica.engine`.

Kept because tools outside this repository import it (the GPU kit's install check in
``shared/gpu/kit/step.sh`` imports ``rayllm_app.engine``); new code imports the replica module.
"""

from rayllm_app.replica.engine import *  # noqa: F403
from rayllm_app.replica.engine import SUPPORTED_VLLM, VLLMEngine, build_engine_kwargs, build_openai_app  # noqa: F401
