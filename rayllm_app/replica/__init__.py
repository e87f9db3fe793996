"""A model's replica: the Ray Serve deployment per model and the vLLM engine it runs.

* :mod:`~rayllm_app.replica.deployment` - the per-model deployment (``ModelServer``), worker groups
* :mod:`~rayllm_app.replica.engine` - the vLLM adapter (the only module that imports vLLM)
* :mod:`~rayllm_app.replica.engine_guard` - kills the engine's processes when the replica dies
* :mod:`~rayllm_app.replica.http_forward` - a forwarded request, its reply, the in-process ASGI call
* :mod:`~rayllm_app.replica.request_defaults` - the YAML's request-side generation defaults
* :mod:`~rayllm_app.replica.stream_channel` - replica -> router byte channel (both sides)

The router imports from here; nothing here imports the router.
"""
