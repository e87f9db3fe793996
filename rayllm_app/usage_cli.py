"""``rayllm usage``: requests and tokens per API key and model, from a running server's
``GET /admin/usage`` (the usage history every router replica writes to the limits store).

Needs a key with ``admin: true`` when authentication is on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from datetime import datetime, timezone
from typing import Any

# Columns of the table: (header, field of a usage row).
COLUMNS = (("KEY", "key"), ("MODEL", "model"), ("REQUESTS", "requests"), ("PROMPT TOKENS", "prompt_tokens"),
           ("COMPLETION TOKENS", "completion_tokens"), ("ERRORS", "errors"))
NUMBER_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
UNIX_TIME_FROM = 1e9  # the server reads values from here up as unix times, below as seconds ago
TIMEOUT_S = 30.0


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``7d`` (or ``1h30m``), or a plain number of seconds.

    A plain number from 10^9 up is a unix time, which the server takes as it is."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise argparse.ArgumentTypeError(
                f"bad duration {text!r}: use 90s, 15m, 1h, 7d, a number of seconds or a unix time") from None
        seconds = sum(float(number) * UNIT_SECONDS[unit] for number, unit in parts)
    if not seconds >= 0 or seconds == float("inf"):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: must be a finite number >= 0")
    return seconds


def server_root(base_url: str) -> str:
    """``http://host:8000/v1`` (the OpenAI base URL the other commands take) -> ``http://host:8000``."""
    root = base_url.rstrip("/")
    return root[:-len("/v1")] if root.endswith("/v1") else root


def error_message(response: Any) -> str:
    """The message of the server's OpenAI error envelope, else the body's text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message"):
        return str(body["error"]["message"])
    if isinstance(body, dict) and body.get("detail"):  # FastAPI's own errors
        return str(body["detail"])
    return response.text.strip()[:500] or response.reason_phrase


def format_table(rows: list[dict[str, Any]]) -> str:
    """An aligned table (text left, numbers right) with a TOTAL line."""
    total = {name: sum(int(row.get(name) or 0) for row in rows) for name in NUMBER_FIELDS}
    cells = [[header for header, _ in COLUMNS]]
    cells += [[str(row.get(name, "")) for _, name in COLUMNS] for row in rows]
    cells.append(["TOTAL", ""] + [str(total[name]) for name in NUMBER_FIELDS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = []
    for line in cells:
        text = [cell.ljust(width) if i < 2 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths))]
        lines.append("  ".join(text).rstrip())
    return "\n".join(lines)


def _number(value: float) -> str:
    """A query value without float formatting's loss (1714550400, not 1.71455e+09)."""
    return str(int(value)) if value == int(value) else repr(value)


def _when(unix: Any) -> str:
    try:
        return datetime.fromtimestamp(float(unix), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(unix)


def cmd_usage(args: argparse.Namespace) -> int:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no "HTTP Request: ..." line in the output
    url = server_root(args.base_url) + "/admin/usage"
    params = {"since": _number(args.since)}
    if args.until is not None:
        params["until"] = _number(args.until)
    api_key = args.api_key or os.environ.get("RAYLLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, params=params, headers=headers, timeout=TIMEOUT_S)
    except httpx.TransportError as error:
        print(f"Cannot reach the server at {url} ({type(error).__name__}: {error or 'no answer'}). Is rayllm "
              "serving there? Point --base-url (or $RAYLLM_BASE_URL) at it.", file=sys.stderr)
        return 1
    if response.status_code >= 400:
        hint = (" (GET /admin/usage needs a key with 'admin: true': pass --api-key or set $RAYLLM_API_KEY)"
                if response.status_code in (401, 403) else "")
        print(f"Error: HTTP {response.status_code}: {error_message(response)}{hint}", file=sys.stderr)
        return 1
    try:
        answer = response.json()
        rows = answer["data"]
    except (ValueError, KeyError, TypeError):
        print(f"Error: {url} did not answer a usage list (is this a rayllm server?): "
              f"{response.text.strip()[:200]}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"Usage from {_when(answer.get('since'))} to {_when(answer.get('until'))}")
    print(format_table(rows))
    return 0


def add_cli(sub: argparse._SubParsersAction, default_base_url: str) -> None:
    """``rayllm usage ...`` (called from rayllm_app.cli.build_parser)."""
    usage = sub.add_parser(
        "usage", help="requests and tokens per API key and model (GET /admin/usage)",
        description="Requests, prompt and completion tokens and errors per API key name and model over a "
        "window, summed across every router replica. Needs a key with 'admin: true' when auth is on.")
    usage.add_argument("--since", type=parse_duration, metavar="DURATION", default=parse_duration("1h"),
                       help="window start: how long ago (90s, 15m, 1h, 7d, seconds) or a unix time "
                       "(default 1h; history is kept a week, per minute)")
    usage.add_argument("--until", type=parse_duration, metavar="DURATION_OR_UNIX", default=None,
                       help="window end, in the same forms (default: now)")
    usage.add_argument("--base-url", default=default_base_url, metavar="URL",
                       help="the server's OpenAI base URL; /admin/usage is read next to /v1 (default "
                       "$RAYLLM_BASE_URL or http://127.0.0.1:8000/v1)")
    usage.add_argument("--api-key", default=None, metavar="KEY",
                       help="an admin key (default $RAYLLM_API_KEY, then $OPENAI_API_KEY)")
    usage.add_argument("--json", action="store_true", help="print the server's JSON answer as it is")
    usage.set_defaults(func=cmd_usage)
