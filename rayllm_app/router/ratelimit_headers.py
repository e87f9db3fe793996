"""OpenAI's rate-limit headers, from a store's decision or from the router's own view.

Sent on every answer of a key with budgets, and on its 429s: ``x-ratelimit-limit-*``,
``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` for requests and tokens.
"""

from __future__ import annotations

from rayllm_app.tenancy.state import Decision


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest}s"


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    return headers_of((("requests", decision.limit_requests, decision.remaining_requests, decision.reset_requests_s),
                       ("tokens", decision.limit_tokens, decision.remaining_tokens, decision.reset_tokens_s)))


def headers_of(limits) -> dict[str, str]:
    """``(kind, limit, remaining, reset_s)`` rows into headers (rows without a limit are left out)."""
    headers: dict[str, str] = {}
    for kind, limit, remaining, reset in limits:
        if limit is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(remaining or 0, 0))
            headers[f"x-ratelimit-reset-{kind}"] = format_reset(reset or 0.0)
    return headers
