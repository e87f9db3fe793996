"""The router: the HTTP ingress that serves the OpenAI API and forwards each request to its model.

* :mod:`~rayllm_app.router.ingress` - the FastAPI ingress deployment (``Router``)
* :mod:`~rayllm_app.router.auth` - API keys and per-key model allow-lists
* :mod:`~rayllm_app.router.middleware` - access logs, request ids, body size limits
* :mod:`~rayllm_app.router.protocol` - what the router reads of a body, model cards, errors
* :mod:`~rayllm_app.router.model_status` - replica states from Serve's status, cold starts
* :mod:`~rayllm_app.router.model_calls` - handle calls to a model's deployment, their errors
* :mod:`~rayllm_app.router.playground` - the browser playground (``static/playground``)

Imports run one way: the router uses :mod:`rayllm_app.replica` (the forwarded request, the
stream channel's router side), never the other way round.
"""
