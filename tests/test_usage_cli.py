"""``rayllm usage`` (rayllm_app.usage_cli) against a tiny local HTTP server with canned
``GET /admin/usage`` answers, and ``rayllm run``'s router flags. No Ray, no model."""

from __future__ import annotations

import argparse
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from rayllm_app import cli
from rayllm_app.config import ConfigError
from rayllm_app.usage_cli import format_table, parse_duration, server_root

USAGE = {
    "object": "list", "since": 1_714_550_400.0, "until": 1_714_554_000.0,
    "data": [
        {"key": "anonymous", "model": "tiny-chat", "requests": 3, "prompt_tokens": 30,
         "completion_tokens": 12, "errors": 0},
        {"key": "team-a", "model": "SmolLM2-135M-Instruct", "requests": 1200, "prompt_tokens": 154321,
         "completion_tokens": 98765, "errors": 7},
        {"key": "team-b", "model": "tiny-chat", "requests": 5, "prompt_tokens": 0, "completion_tokens": 0,
         "errors": 5},
    ],
}
FORBIDDEN = {"error": {"message": "GET /admin/usage needs an API key with 'admin: true' in the keys file.",
                       "type": "invalid_request_error", "param": None, "code": "admin_required"}}


@dataclass
class Server:
    url: str
    reply: tuple[int, bytes, str] = (200, json.dumps(USAGE).encode(), "application/json")
    requests: list[dict] = field(default_factory=list)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for name in ("RAYLLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    state: Server

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            state.requests.append({"path": url.path, "query": parse_qs(url.query),
                                   "authorization": self.headers.get("Authorization")})
            status, body, content_type = state.reply if url.path == "/admin/usage" else (404, b"{}", "text/plain")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Server(f"http://127.0.0.1:{httpd.server_address[1]}/v1")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def usage(server_url: str, *args: str) -> int:
    return cli.main(["usage", "--base-url", server_url, *args])


def test_table_with_rows_and_total(server: Server, capsys: pytest.CaptureFixture):
    assert usage(server.url, "--api-key", "sk-admin", "--since", "2h", "--until", "15m") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Usage from 2024-05-01 08:00:00 UTC to 2024-05-01 09:00:00 UTC"
    table = lines[1:]
    assert table[0].split() == ["KEY", "MODEL", "REQUESTS", "PROMPT", "TOKENS", "COMPLETION", "TOKENS", "ERRORS"]
    assert table[1].split() == ["anonymous", "tiny-chat", "3", "30", "12", "0"]
    assert table[2].split() == ["team-a", "SmolLM2-135M-Instruct", "1200", "154321", "98765", "7"]
    assert table[3].split() == ["team-b", "tiny-chat", "5", "0", "0", "5"]
    assert table[4].split() == ["TOTAL", "1208", "154351", "98777", "12"]
    assert len(table) == 5
    # aligned: text columns start together, numbers end together (every line as wide as the header)
    assert len({len(line) for line in table}) == 1
    assert {line.index(word) for line, word in zip(table[1:4], ("tiny-chat", "SmolLM2", "tiny-chat"))} \
        == {table[0].index("MODEL")}
    (request,) = server.requests
    assert request["path"] == "/admin/usage"
    assert request["query"] == {"since": ["7200"], "until": ["900"]}
    assert request["authorization"] == "Bearer sk-admin"


def test_json_prints_the_servers_answer(server: Server, capsys: pytest.CaptureFixture):
    assert usage(server.url, "--json") == 0
    assert json.loads(capsys.readouterr().out) == USAGE
    assert server.requests[0]["query"] == {"since": ["3600"]}   # default window: the last hour
    assert server.requests[0]["authorization"] is None          # no key anywhere: none sent


def test_empty_window_prints_a_zero_total(server: Server, capsys: pytest.CaptureFixture):
    server.reply = (200, json.dumps({**USAGE, "data": []}).encode(), "application/json")
    assert usage(server.url) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split() == ["TOTAL", "0", "0", "0", "0"]
    assert lines[-2].startswith("KEY")


def test_forbidden_prints_the_servers_message_and_exits_1(server: Server, capsys: pytest.CaptureFixture):
    server.reply = (403, json.dumps(FORBIDDEN).encode(), "application/json")
    assert usage(server.url, "--api-key", "sk-not-admin") == 1
    captured = capsys.readouterr()
    assert "HTTP 403" in captured.err
    assert FORBIDDEN["error"]["message"] in captured.err
    assert "TOTAL" not in captured.out


def test_error_without_an_envelope_prints_the_body(server: Server, capsys: pytest.CaptureFixture):
    server.reply = (502, b"upstream went away", "text/plain")
    assert usage(server.url) == 1
    assert "HTTP 502: upstream went away" in capsys.readouterr().err


def test_an_answer_that_is_not_a_usage_list_exits_1(server: Server, capsys: pytest.CaptureFixture):
    server.reply = (200, b"<html>hello</html>", "text/html")
    assert usage(server.url) == 1
    assert "did not answer a usage list" in capsys.readouterr().err


def test_unreachable_server_exits_1_with_a_clear_message(capsys: pytest.CaptureFixture):
    with socket.socket() as sock:   # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert usage(f"http://127.0.0.1:{port}/v1") == 1
    err = capsys.readouterr().err
    assert f"Cannot reach the server at http://127.0.0.1:{port}/admin/usage" in err
    assert "--base-url" in err


@pytest.mark.parametrize("env, expected", [
    ({"RAYLLM_API_KEY": "sk-rayllm", "OPENAI_API_KEY": "sk-openai"}, "Bearer sk-rayllm"),
    ({"OPENAI_API_KEY": "sk-openai"}, "Bearer sk-openai"),
])
def test_api_key_from_the_environment(server: Server, monkeypatch: pytest.MonkeyPatch, env: dict, expected: str,
                                      capsys: pytest.CaptureFixture):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert usage(server.url) == 0
    assert server.requests[-1]["authorization"] == expected
    assert usage(server.url, "--api-key", "sk-flag") == 0   # the flag wins
    assert server.requests[-1]["authorization"] == "Bearer sk-flag"


@pytest.mark.parametrize("suffix", ["", "/", "/v1/"])
def test_base_url_forms_reach_the_same_root(server: Server, suffix: str, capsys: pytest.CaptureFixture):
    root = server.url.removesuffix("/v1")
    assert usage(root + suffix) == 0
    assert server.requests[-1]["path"] == "/admin/usage"


def test_server_root():
    assert server_root("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000"
    assert server_root("https://llm.example.com/v1/") == "https://llm.example.com"
    assert server_root("https://example.com/llm/v1") == "https://example.com/llm"   # behind a path prefix
    assert server_root("http://host:8000") == "http://host:8000"


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800), ("1h30m", 5400), ("1.5h", 5400),
    ("120", 120), ("0", 0), (" 2H ", 7200), ("1714550400", 1714550400)])
def test_parse_duration(text: str, seconds: float):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1w", "-5", "h", "1h-", "5 m", "nan", "inf", "1h 30m", "m5"])
def test_parse_duration_refuses(text: str):
    with pytest.raises(argparse.ArgumentTypeError, match="bad duration"):
        parse_duration(text)


def test_bad_duration_is_a_usage_error(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exited:
        cli.main(["usage", "--since", "soon"])
    assert exited.value.code == 2
    assert "bad duration 'soon'" in capsys.readouterr().err


def test_unix_times_are_sent_exactly(server: Server, capsys: pytest.CaptureFixture):
    assert usage(server.url, "--since", "1714550400", "--until", "1714554000") == 0
    assert server.requests[-1]["query"] == {"since": ["1714550400"], "until": ["1714554000"]}


def test_format_table_totals_missing_numbers_as_zero():
    text = format_table([{"key": "a", "model": "m", "requests": 2}])
    assert text.splitlines()[-1].split() == ["TOTAL", "2", "0", "0", "0"]


# --------------------------------------------------------------------------- rayllm run's router flags

def run_args(*flags: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["run", "--model", "models/x.yaml", *flags])


def test_run_router_flags_fill_router_settings():
    settings = cli._router_settings(run_args("--router-replicas", "3", "--limits-store", "redis://cache:6379/0",
                                             "--limits-store-failure", "closed"))
    assert (settings.replicas, settings.limits_store, settings.limits_store_failure) == (
        3, "redis://cache:6379/0", "closed")
    defaults = cli._router_settings(run_args())
    assert (defaults.replicas, defaults.limits_store, defaults.limits_store_failure) == (1, None, "open")
    assert cli._router_settings(run_args("--limits-store", "embedded")).limits_store == "embedded"


def test_router_replicas_flag_takes_a_count_per_node_or_an_autoscaling_range():
    from rayllm_app.app import router_scaling
    from rayllm_app.config.router_settings import RouterSettings

    fixed = cli._router_settings(run_args("--router-replicas", "4"))
    assert router_scaling(fixed) == {"num_replicas": 4}
    per_node = cli._router_settings(run_args("--router-replicas", "per-node"))
    assert per_node.replicas == "per_node"
    assert router_scaling(per_node) == {"num_replicas": 1, "max_replicas_per_node": 1}  # no Ray here: 1 node
    assert router_scaling(RouterSettings(replicas=3, max_per_node=1)) == {"num_replicas": 3, "max_replicas_per_node": 1}
    ranged = cli._router_settings(run_args("--router-replicas", "2-6"))
    assert router_scaling(ranged) == {"autoscaling_config": {"min_replicas": 2, "max_replicas": 6,
                                                             "target_ongoing_requests": 64}}
    for bad in ("two", "3-", "-2", "per-rack"):
        with pytest.raises(SystemExit):
            run_args("--router-replicas", bad)
    with pytest.raises(ConfigError, match="max_replicas \\(2\\) is below min_replicas \\(5\\)"):
        cli._router_settings(run_args("--router-replicas", "5-2"))


def test_fast_path_environment_moves_haproxy_side_ports_off_fixed_numbers():
    env = cli._fast_path_environment("127.0.0.1", {"RAY_SERVE_HAPROXY_STATS_PORT": "9999"})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in env  # the user's own setting stays
    ports = {int(env[name]) for name in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")}
    assert len(ports) == 2 and not ports & {8404, 9101, 8500}
    assert cli._fast_path_environment("127.0.0.1", {"RAY_SERVE_ENABLE_HA_PROXY": "0"}).get(
        "RAY_SERVE_ENABLE_HA_PROXY") is None  # an explicit opt-out is kept


def test_run_router_flags_are_checked_before_anything_starts(capsys: pytest.CaptureFixture):
    with pytest.raises(ConfigError, match="replicas"):
        cli._router_settings(run_args("--router-replicas", "0"))
    with pytest.raises(ConfigError, match="replicas"):
        cli._router_settings(run_args("--router-replicas", "65"))
    for flags in (("--limits-store", "mysql://db"), ("--limits-store-failure", "maybe")):
        with pytest.raises(SystemExit) as exited:
            run_args(*flags)
        assert exited.value.code == 2
    assert "mysql://db" in capsys.readouterr().err


def test_run_responses_store_flags_reach_the_router_and_the_replicas():
    settings = cli._router_settings(run_args("--responses-store", "redis://cache:6379/1",
                                             "--responses-file", "/data/responses.sqlite3"))
    assert settings.responses_store_args() == {"url": "redis://cache:6379/1", "path": "/data/responses.sqlite3",
                                               "ttl_s": 30 * 24 * 3600.0}
    assert cli._router_settings(run_args()).responses_store_args()["url"] is None  # the embedded store
    with pytest.raises(SystemExit):
        run_args("--responses-store", "postgres://db")


def test_a_bad_responses_store_in_args_router_names_the_field():
    from rayllm_app.app import build_app

    with pytest.raises(ConfigError, match=r"(?s)args\.router: invalid router settings.*responses_store"):
        build_app({"models": ["models/smollm2-135m-instruct.yaml"], "router": {"responses_store": "s3://bucket"}})
