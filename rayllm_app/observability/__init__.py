"""Observability: Prometheus metrics recorded by replicas and engines, re-exported by the router
(:mod:`~rayllm_app.observability.metrics`)."""
