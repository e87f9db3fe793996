"""``rayllm bench``: a load generator for any OpenAI-compatible server.

* :mod:`~rayllm_app.bench.runner` - the load loop and the command (``add_arguments``, ``run``)
* :mod:`~rayllm_app.bench.workload` - the run configuration, prompt lengths, request bodies
* :mod:`~rayllm_app.bench.client` - SSE parsing, token accounting, one request
* :mod:`~rayllm_app.bench.report` - statistics, result objects, reports, the progress line

Library use::

    from rayllm_app.bench import BenchConfig, run_benchmark
    result = asyncio.run(run_benchmark(BenchConfig(base_url=..., model=..., concurrency=4)))

``python -m rayllm_app.bench ...`` is ``rayllm bench ...``.
"""

from __future__ import annotations

from rayllm_app.bench import runner as _runner
from rayllm_app.bench.runner import *  # noqa: F403 - the package's API is the runner's __all__

__all__ = _runner.__all__
