"""The browser playground, end to end: the router's page in a real headless Chromium.

Needs Debian's ``chromium`` at /usr/bin/chromium (``apt-get install -y chromium``) and the
``playwright`` package; Playwright's own browser download is not used.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL, TINY_A, TINY_B, wait_engine_idle

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
STREAM_TIMEOUT_MS = 180_000
WIDE = {"width": 1280, "height": 900}
NARROW = {"width": 480, "height": 900}
IGNORE_EOS = {"ignore_eos": True}


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's browser with `apt-get install -y chromium`")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class PageWatch:
    """Everything the page did that a test may want to check afterwards."""

    def __init__(self, page, root_url: str) -> None:
        self.root_url = root_url
        self.requests: list[str] = []
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        self.aborted: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))
        page.on("requestfailed", lambda request: self.aborted.append(request.url))

    def check_clean(self) -> None:
        """No uncaught script errors, no CSP violations, no request leaving this server."""
        assert not self.page_errors, self.page_errors
        assert not [m for m in self.console_errors if "Content Security Policy" in m], self.console_errors
        foreign = [url for url in self.requests if not url.startswith(self.root_url + "/") and url != "data:,"]
        assert not foreign, f"the page made requests outside its server: {foreign}"


@pytest.fixture()
def page(browser, served_app):
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.watch = PageWatch(page, served_app.root_url)
    yield page
    context.close()


def api_key_of(served_app) -> str | None:
    return getattr(served_app, "api_key", None)


def open_playground(page, served_app, path: str = "/") -> None:
    """Load the page; when the server wants a key, enter it, and wait for the model list."""
    page.goto(served_app.root_url + path)
    status = page.locator("#models-status")
    page.wait_for_function("() => !document.querySelector('#models-status').textContent.startsWith('Loading')")
    key = api_key_of(served_app)
    if key:
        assert "401" in status.inner_text()
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Load models").click()
    page.wait_for_selector("#model-list input[type=checkbox]")
    assert re.search(r"\d+ models? served", status.inner_text()), status.inner_text()


def choose_models(page, *wanted: str) -> None:
    for box in page.locator("#model-list input[type=checkbox]").all():
        if box.get_attribute("value") not in wanted and box.is_checked():
            box.uncheck()
    for model in wanted:
        page.get_by_label(model, exact=True).check()


def set_params(page, prompt: str, max_tokens: int, temperature: float = 0.8, extra: dict | None = None) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Temperature").fill(str(temperature))
    page.get_by_label("Max tokens").fill(str(max_tokens))
    extra_field = page.get_by_label("Extra request fields")
    if extra and not extra_field.is_visible():
        page.get_by_text("More parameters").click()
    if extra or extra_field.is_visible():
        extra_field.fill(json.dumps(extra) if extra else "")


def column(page, model: str):
    return page.locator(f"#results article.column[data-model='{model}']")


def metric(page, model: str, name: str) -> str:
    return column(page, model).locator(f"[data-metric='{name}']").inner_text()


def wait_states(page, models: list[str], states: tuple[str, ...], timeout: int = STREAM_TIMEOUT_MS) -> None:
    page.wait_for_function(
        """([models, states]) => models.every((m) => {
             const col = document.querySelector(`#results article.column[data-model='${m}']`);
             return col && states.includes(col.dataset.state);
           })""",
        arg=[models, list(states)], timeout=timeout)


RECORD_METRICS = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    for (const col of document.querySelectorAll('#results article.column')) {
      window.__seen.push({model: col.dataset.model, state: col.dataset.state,
                          tokens: col.querySelector('[data-metric=completion-tokens]').textContent,
                          chars: col.querySelector('[data-role=output]').textContent.length});
    }
  }).observe(document.querySelector('#results'),
             {subtree: true, childList: true, characterData: true, attributes: true});
}"""


# ------------------------------------------------------------------ tests


def test_mount_serves_page_and_assets_from_package_data():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from rayllm_app.router.playground import mount_playground

    app = FastAPI()
    mount_playground(app)
    client = TestClient(app)
    page = client.get("/playground")
    assert page.status_code == 200 and '<base href="/">' in page.text
    assert client.get("/").text == page.text
    assert client.head("/").status_code == 200
    assert client.get("/", headers={"If-None-Match": page.headers["etag"]}).status_code == 304
    script = client.get("/playground/static/app.js")
    assert script.headers["content-type"].startswith("text/javascript") and "AbortController" in script.text
    assert client.get("/playground/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/playground/static/..%2F..%2Fplayground.py").status_code == 404
    assert client.get("/playground/static/index.html").status_code == 404
    assert "/" not in app.openapi()["paths"]
    # Behind a route prefix every URL in the page follows the root path.
    prefixed = TestClient(app, root_path="/llm").get("/playground")
    assert '<base href="/llm/">' in prefixed.text
    # Nothing in the page reaches outside its own server.
    for name in ("index.html", "app.js", "style.css"):
        text = (Path(__file__).resolve().parents[2] / "rayllm_app/router/static/playground" / name).read_text()
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|localStorage|sessionStorage|document\.cookie",
                             text), name


@pytest.mark.e2e
def test_page_and_assets_are_served(served_app):
    for path in ("/", "/playground"):
        response = httpx.get(served_app.root_url + path, timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert 'src="playground/static/app.js"' in response.text
        cached = httpx.get(served_app.root_url + path, headers={"If-None-Match": response.headers["etag"]})
        assert cached.status_code == 304
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{served_app.root_url}/playground/static/{name}", timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    missing = httpx.get(f"{served_app.root_url}/playground/static/secrets.txt", timeout=30)
    assert missing.status_code == 404
    # Page routes stay out of the OpenAPI schema.
    schema = httpx.get(f"{served_app.root_url}/openapi.json", timeout=30)
    if schema.status_code == 200:
        assert not any(p == "/" or p.startswith("/playground") for p in schema.json()["paths"])


@pytest.mark.e2e
def test_two_models_stream_side_by_side_with_metrics(page, served_app):
    open_playground(page, served_app)
    # The tiny model streams 200 tokens in about a second; SmolLM2 takes several, long enough to
    # watch it stream live. Either may write its end token early now and then; the runs ignore it.
    choose_models(page, TINY_A, DEFAULT_MODEL)
    set_params(page, "Write a long story about a lighthouse keeper.", max_tokens=200, extra=IGNORE_EOS)
    page.evaluate(RECORD_METRICS)
    page.get_by_label("Prompt", exact=True).press("Control+Enter")  # the keyboard shortcut sends
    wait_states(page, [TINY_A, DEFAULT_MODEL], ("done", "error", "stopped"))

    seen = page.evaluate("window.__seen")
    for model in (TINY_A, DEFAULT_MODEL):
        col = column(page, model)
        assert col.get_attribute("data-state") == "done", col.inner_text()
        assert col.locator("[data-role=error]").is_hidden()
        text = col.locator("[data-role=output]").inner_text()
        assert text.strip(), f"{model} streamed no text"
        assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", metric(page, model, "ttft")), metric(page, model, "ttft")
        assert re.fullmatch(r"\d+\.\d", metric(page, model, "tps")), metric(page, model, "tps")
        completion = metric(page, model, "completion-tokens")
        assert re.fullmatch(r"\d+", completion), f"exact count from usage expected, got {completion!r}"
        assert int(completion) == 200
        assert int(metric(page, model, "prompt-tokens")) > 0
        assert metric(page, model, "finish") == "length"
    # While streaming, a column shows a live (estimated) token count and growing text. A busy
    # machine may stall the browser and then hand it a whole stream in one read (the router joins
    # the frames already waiting), leaving nothing live to see: then the same run is repeated, at
    # most twice more, and one of the two columns must show it.
    def live(model: str, seen: list[dict]) -> bool:
        mine = [s for s in seen if s["model"] == model and s["state"] == "streaming"]
        return any(s["tokens"].startswith("~") for s in mine) and len({s["chars"] for s in mine}) > 2

    for _ in range(2):
        if live(TINY_A, seen) or live(DEFAULT_MODEL, seen):
            break
        page.evaluate(RECORD_METRICS)
        page.get_by_label("Prompt", exact=True).press("Control+Enter")
        time.sleep(0.2)
        wait_states(page, [TINY_A, DEFAULT_MODEL], ("done", "error", "stopped"))
        seen = page.evaluate("window.__seen")
    assert live(TINY_A, seen) or live(DEFAULT_MODEL, seen), seen[-6:]
    assert _overlapped(seen), "the page did not send to both models at once"
    assert "Finished" in page.locator("#run-status").inner_text()
    assert page.get_by_role("button", name="Send").is_enabled()
    assert page.get_by_role("button", name="Stop").is_disabled()

    # Wide window: the two columns sit side by side.
    first, second = (column(page, m).bounding_box() for m in (TINY_A, DEFAULT_MODEL))
    assert abs(first["y"] - second["y"]) < 2 and second["x"] > first["x"] + first["width"] - 1
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    # Narrow window: the columns stack.
    page.set_viewport_size(NARROW)
    first, second = (column(page, m).bounding_box() for m in (TINY_A, DEFAULT_MODEL))
    assert abs(first["x"] - second["x"]) < 2 and second["y"] >= first["y"] + first["height"]
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"], "horizontal scroll"
    page.screenshot(path=str(ARTIFACTS / "playground-narrow.png"), full_page=True)
    page.watch.check_clean()


def _overlapped(seen: list[dict]) -> bool:
    """Whether at some moment both columns had their request in flight (waiting or streaming):
    the page sends to every model at once instead of one after the other."""
    last: dict[str, str] = {}
    for s in seen:
        last[s["model"]] = s["state"]
        if sum(state in ("waiting", "streaming") for state in last.values()) >= 2:
            return True
    return False


# Escape, pressed the moment the first answer starts: in the page itself, so that no delay of
# the test process (a busy 2-core machine can stall it for seconds) lets a stream finish first.
ESCAPE_WHEN_FIRST_ANSWER_STARTS = """() => {
  const results = document.querySelector('#results');
  const observer = new MutationObserver(() => {
    const columns = [...results.querySelectorAll('article.column')];
    if (!columns.some((c) => c.dataset.state === 'streaming')) return;
    observer.disconnect();
    window.__escapedAt = columns.map((c) => c.dataset.state);
    (document.activeElement || document.body).dispatchEvent(
      new KeyboardEvent('keydown', {key: 'Escape', bubbles: true, cancelable: true}));
  });
  observer.observe(results, {subtree: true, attributes: true, attributeFilter: ['data-state']});
}"""


@pytest.mark.e2e
def test_stop_cancels_every_stream(page, served_app):
    open_playground(page, served_app, "/playground")
    # SmolLM2 needs ~20 s for 400 tokens here, so only an abort frees its engine within 10 s.
    choose_models(page, TINY_A, DEFAULT_MODEL)
    set_params(page, "Count to a thousand.", max_tokens=400, extra=IGNORE_EOS)
    page.evaluate(ESCAPE_WHEN_FIRST_ANSWER_STARTS)
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => window.__escapedAt", timeout=STREAM_TIMEOUT_MS)
    # Escape (wherever the focus is) stops every column at once, a streaming or a waiting one.
    assert "streaming" in page.evaluate("window.__escapedAt")
    wait_states(page, [TINY_A, DEFAULT_MODEL], ("stopped",), timeout=5_000)
    stopped_at = time.monotonic()

    time.sleep(1.5)
    for model in (TINY_A, DEFAULT_MODEL):
        col = column(page, model)
        assert col.locator("[data-role=state]").inner_text() == "stopped"
        assert metric(page, model, "finish") == "stopped"
        # Bytes the browser already held when Escape was pressed are not shown either.
        assert col.locator("[data-role=output]").inner_text() == "", "text arrived after Stop"
        assert metric(page, model, "completion-tokens") == "–"
    assert "Stopped" in page.locator("#run-status").inner_text()
    page.screenshot(path=str(ARTIFACTS / "playground-stopped.png"), full_page=True)
    assert page.get_by_role("button", name="Send").is_enabled()
    assert page.get_by_role("button", name="Stop").is_disabled()
    # The browser closed both HTTP connections...
    aborted = [url for url in page.watch.aborted if url.endswith("/v1/chat/completions")]
    assert len(aborted) == 2, page.watch.aborted
    # ...and the engines dropped the requests.
    for model in (TINY_A, DEFAULT_MODEL):
        running = wait_engine_idle(model, deadline=stopped_at + 10)
        assert not running, f"{model} still holds {running} request(s) after Stop"
    page.watch.check_clean()


@pytest.mark.e2e
def test_api_errors_are_shown_in_the_column(page, served_app):
    # A model this server does not serve (added to the list the page sees) -> 404 from the API.
    def with_ghost_model(route):
        response = route.fetch()
        body = response.json()
        body.get("data", []).append({"id": "ghost-model", "object": "model", "max_model_len": 512,
                             "metadata": {"description": "not served", "context_length": 512}})
        route.fulfill(response=response, json=body)

    page.route("**/v1/models", with_ghost_model)
    open_playground(page, served_app)

    # 400: more tokens than the tiny model's context; 404: the unknown model.
    choose_models(page, TINY_A, "ghost-model")
    set_params(page, "hello", max_tokens=5000)
    page.get_by_role("button", name="Send").click()
    wait_states(page, [TINY_A, "ghost-model"], ("error",))
    bad_params = column(page, TINY_A).locator("[data-role=error]")
    assert bad_params.is_visible()
    message = bad_params.inner_text()
    assert re.search(r"Error 400: .*(context length|max_model_len)\D*512", message), message
    assert column(page, TINY_A).locator("[data-role=state]").inner_text() == "error 400"
    unknown = column(page, "ghost-model").locator("[data-role=error]").inner_text()
    assert re.search(r"Error 404: The model 'ghost-model' does not exist", unknown), unknown
    page.screenshot(path=str(ARTIFACTS / "playground-errors.png"), full_page=True)

    # An error event in the middle of a stream: the text so far stays, the error shows.
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": TINY_B,
             "choices": [{"index": 0, "delta": {"content": "partial answer"}, "finish_reason": None}]}
    error = {"error": {"message": f"The replica serving model '{TINY_B}' stopped while handling this request; "
                                  "retry it.", "type": "service_unavailable", "param": None,
                       "code": "model_unavailable"}}
    sse = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n"
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse))
    choose_models(page, TINY_B)
    set_params(page, "hello", max_tokens=20)
    page.get_by_role("button", name="Send").click()
    wait_states(page, [TINY_B], ("error",))
    col = column(page, TINY_B)
    assert col.locator("[data-role=output]").inner_text() == "partial answer"
    assert "replica serving model" in col.locator("[data-role=error]").inner_text()
    assert "model_unavailable" in col.locator("[data-role=error]").inner_text()
    page.screenshot(path=str(ARTIFACTS / "playground-stream-error.png"), full_page=True)
    page.watch.check_clean()


@pytest.mark.e2e
def test_missing_or_bad_api_key_shows_the_401_message(page, served_app):
    key = api_key_of(served_app)
    if not key:
        pytest.skip("the served app has no API key configured (auth is off)")
    page.goto(served_app.root_url + "/")
    status = page.locator("#models-status")
    page.wait_for_function("() => document.querySelector('#models-status').dataset.kind === 'error'")
    assert re.search(r"Error 401: .*API key", status.inner_text()), status.inner_text()
    key_field = page.get_by_label("API key")
    assert page.evaluate("document.activeElement.id") == "api-key", "the key field should take the focus"
    assert key_field.get_attribute("aria-invalid") == "true"
    assert page.locator("#model-list input").count() == 0
    page.screenshot(path=str(ARTIFACTS / "playground-401.png"), full_page=True)

    key_field.fill("sk-wrong-key")
    key_field.press("Enter")
    page.wait_for_function("() => /Invalid API key/.test(document.querySelector('#models-status').textContent)")
    assert "sk-wrong-key" not in status.inner_text()

    key_field.fill(key)
    page.get_by_role("button", name="Load models").click()
    page.wait_for_selector("#model-list input[type=checkbox]")
    assert page.get_by_label(TINY_A, exact=True).count() == 1

    # A key that goes bad after the models loaded: the column shows the 401.
    key_field.fill("sk-wrong-key")
    choose_models(page, TINY_A)
    set_params(page, "hello", max_tokens=5)
    page.get_by_role("button", name="Send").click()
    wait_states(page, [TINY_A], ("error",))
    message = column(page, TINY_A).locator("[data-role=error]").inner_text()
    assert "Error 401" in message and "Invalid API key" in message, message

    # The key is only ever in page memory.
    stored = page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""], stored
    page.watch.check_clean()
