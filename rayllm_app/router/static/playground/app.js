// rayllm playground: compare up to three models side by side on this server's OpenAI API.
// Plain browser JavaScript, no build step, no external requests. All URLs are relative to
// the page's <base href>, which the server sets to its root path.
"use strict";

(() => {
  const MAX_MODELS = 3;
  const TICK_MS = 100;

  const $ = (id) => document.getElementById(id);
  const el = {
    keyForm: $("key-form"),
    keyInput: $("api-key"),
    loadModels: $("load-models"),
    modelsStatus: $("models-status"),
    modelsHint: $("models-hint"),
    modelList: $("model-list"),
    compose: $("compose"),
    system: $("system"),
    prompt: $("prompt"),
    temperature: $("temperature"),
    topP: $("top-p"),
    maxTokens: $("max-tokens"),
    maxTokensHint: $("max-tokens-hint"),
    extra: $("extra-params"),
    send: $("send"),
    stop: $("stop"),
    composeError: $("compose-error"),
    runStatus: $("run-status"),
    results: $("results"),
    template: $("column-template"),
  };

  // The API key lives only in this variable (page memory): never in storage, cookies or URLs.
  let apiKey = "";
  let models = [];
  let selected = []; // model ids, in the order they were picked
  let run = null; // {controller, columns, timer, started}

  function authHeaders(extra) {
    const headers = Object.assign({}, extra);
    if (apiKey) headers.Authorization = "Bearer " + apiKey;
    return headers;
  }

  // ---- errors -------------------------------------------------------------------------

  // Turn a failed response into {status, message, type, code, retryAfter}; the server sends
  // OpenAI-shaped bodies {"error": {"message", "type", "param", "code"}}.
  async function readError(resp) {
    let text = "";
    try {
      text = await resp.text();
    } catch (_) {
      // the body could not be read; fall back to the status line
    }
    let error = null;
    try {
      error = JSON.parse(text).error;
    } catch (_) {
      // not JSON
    }
    let message = "";
    if (error && typeof error === "object") message = String(error.message || "");
    else if (typeof error === "string") message = error;
    if (!message) message = text.trim().slice(0, 500) || resp.statusText || "Request failed";
    return {
      status: resp.status,
      message,
      type: error && error.type,
      code: error && error.code,
      retryAfter: resp.headers.get("Retry-After"),
    };
  }

  function errorHint(err) {
    if (err.status === 401) return "Enter a valid API key in the API key field, then retry.";
    if (err.status === 403) return "This API key may not use this model.";
    if ((err.status === 429 || err.status === 503) && err.retryAfter) {
      return "Retry after " + err.retryAfter + " s.";
    }
    return "";
  }

  function describeError(err) {
    const head = err.status ? "Error " + err.status + ": " : "Error: ";
    const detail = [err.type, err.code].filter(Boolean).join(", ");
    const hint = errorHint(err);
    return head + err.message + (detail ? " (" + detail + ")" : "") + (hint ? " " + hint : "");
  }

  // ---- models -------------------------------------------------------------------------

  function setModelsStatus(text, kind) {
    el.modelsStatus.textContent = text;
    el.modelsStatus.dataset.kind = kind || "info";
  }

  async function loadModels() {
    setModelsStatus("Loading models…");
    el.loadModels.disabled = true;
    let resp;
    try {
      resp = await fetch("v1/models", { headers: authHeaders(), cache: "no-store" });
    } catch (e) {
      el.loadModels.disabled = false;
      setModelsStatus("Could not reach the server: " + e.message, "error");
      return;
    }
    el.loadModels.disabled = false;
    if (!resp.ok) {
      const err = await readError(resp);
      models = [];
      renderModels();
      setModelsStatus(describeError(err), "error");
      if (err.status === 401 || err.status === 403) {
        el.keyInput.setAttribute("aria-invalid", "true");
        el.keyInput.focus();
      }
      return;
    }
    el.keyInput.removeAttribute("aria-invalid");
    let body;
    try {
      body = await resp.json();
    } catch (e) {
      setModelsStatus("The server's model list is not valid JSON: " + e.message, "error");
      return;
    }
    models = Array.isArray(body.data) ? body.data : [];
    const ids = new Set(models.map((m) => m.id));
    selected = selected.filter((id) => ids.has(id));
    if (!selected.length && models.length) selected = [models[0].id];
    renderModels();
    const n = models.length;
    setModelsStatus(n ? n + (n === 1 ? " model" : " models") + " served." : "This server serves no models.",
                    n ? "ok" : "error");
  }

  function contextLength(model) {
    const meta = model.metadata || {};
    return model.max_model_len || meta.context_length || null;
  }

  function renderModels() {
    el.modelList.replaceChildren();
    if (!models.length) {
      const empty = document.createElement("p");
      empty.className = "hint empty";
      empty.textContent = "The served models appear here once the server's list loads.";
      el.modelList.append(empty);
    }
    models.forEach((model, i) => {
      const id = "model-" + i;
      const option = document.createElement("div");
      option.className = "model-option";
      const box = document.createElement("input");
      box.type = "checkbox";
      box.id = id;
      box.value = model.id;
      box.checked = selected.includes(model.id);
      box.addEventListener("change", () => onModelToggle(box));
      const label = document.createElement("label");
      label.htmlFor = id;
      label.className = "model-name";
      label.textContent = model.id;
      const meta = document.createElement("span");
      meta.className = "model-meta";
      meta.id = id + "-meta";
      const parts = [];
      const ctx = contextLength(model);
      if (ctx) parts.push("context " + ctx.toLocaleString() + " tokens");
      const description = model.metadata && model.metadata.description;
      if (description) parts.push(description);
      meta.textContent = parts.join(" · ");
      box.setAttribute("aria-describedby", meta.id);
      option.append(box, label, meta);
      el.modelList.append(option);
    });
    updateModelLimits();
  }

  function onModelToggle(box) {
    if (box.checked) {
      if (selected.length >= MAX_MODELS) {
        box.checked = false;
        return;
      }
      if (!selected.includes(box.value)) selected.push(box.value);
    } else {
      selected = selected.filter((id) => id !== box.value);
    }
    updateModelLimits();
  }

  function updateModelLimits() {
    const full = selected.length >= MAX_MODELS;
    for (const box of el.modelList.querySelectorAll("input[type=checkbox]")) {
      box.disabled = full && !box.checked;
      box.closest(".model-option").classList.toggle("checked", box.checked);
    }
    el.modelsHint.textContent = "(" + selected.length + " of up to " + MAX_MODELS + " chosen)";
    const limits = selected
      .map((id) => models.find((m) => m.id === id))
      .filter(Boolean)
      .map(contextLength)
      .filter(Boolean);
    el.maxTokensHint.textContent = limits.length
      ? "Context: " + Math.min(...limits).toLocaleString() + " tokens, prompt included."
      : "";
  }

  // ---- one column per model ----------------------------------------------------------

  function formatMs(ms) {
    if (ms == null || !isFinite(ms)) return "–";
    return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(2) + " s";
  }

  class Column {
    constructor(model, index) {
      this.model = model;
      this.root = el.template.content.firstElementChild.cloneNode(true);
      this.root.dataset.model = model;
      const titleId = "column-title-" + index;
      const title = this.root.querySelector(".column-title");
      title.id = titleId;
      title.textContent = model;
      this.root.setAttribute("aria-labelledby", titleId);
      this.badge = this.root.querySelector("[data-role=state]");
      this.errorBox = this.root.querySelector("[data-role=error]");
      this.output = this.root.querySelector("[data-role=output]");
      this.output.setAttribute("aria-label", "Answer from " + model);
      this.text = null; // created on the first token, so an empty answer box stays :empty
      this.metric = {};
      for (const node of this.root.querySelectorAll("[data-metric]")) this.metric[node.dataset.metric] = node;
      this.state = "idle";
      this.t0 = 0;
      this.tFirst = null;
      this.tLast = null;
      this.tEnd = null;
      this.chunks = 0; // content-bearing chunks: the token estimate until usage arrives
      this.usage = null;
      this.finish = null;
      this.sawDone = false;
      this.renderQueued = false;
    }

    get active() {
      return this.state === "waiting" || this.state === "streaming";
    }

    setState(state, label) {
      this.state = state;
      this.root.dataset.state = state;
      this.badge.textContent = label || state;
      if (!this.active && this.tEnd == null) this.tEnd = performance.now();
      this.render();
    }

    showError(err) {
      if (this.state === "stopped") return; // Stop wins over whatever the aborted request said
      this.errorBox.textContent = describeError(err);
      this.errorBox.hidden = false;
      this.setState("error", err.status ? "error " + err.status : "error");
    }

    append(content) {
      const out = this.output;
      const atBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 24;
      if (!this.text) {
        this.text = document.createTextNode("");
        out.append(this.text);
      }
      this.text.appendData(content);
      if (atBottom) out.scrollTop = out.scrollHeight;
      this.scheduleRender();
    }

    // Metrics follow the tokens at most once per frame (the ticker covers hidden tabs).
    scheduleRender() {
      if (this.renderQueued) return;
      this.renderQueued = true;
      requestAnimationFrame(() => {
        this.renderQueued = false;
        this.render();
      });
    }

    render() {
      const now = this.tEnd != null ? this.tEnd : performance.now();
      const exact = this.usage && typeof this.usage.completion_tokens === "number";
      const outputTokens = exact ? this.usage.completion_tokens : this.chunks;
      this.metric.ttft.textContent = this.tFirst != null ? formatMs(this.tFirst - this.t0) : "–";
      let tps = "–";
      if (this.tFirst != null && outputTokens >= 2) {
        // Decode speed: tokens after the first, over the time since the first.
        const end = this.active ? now : (this.tLast || now);
        const seconds = (end - this.tFirst) / 1000;
        if (seconds > 0) tps = ((outputTokens - 1) / seconds).toFixed(1);
      }
      this.metric.tps.textContent = tps;
      const promptTokens = this.usage && this.usage.prompt_tokens;
      this.metric["prompt-tokens"].textContent = typeof promptTokens === "number" ? String(promptTokens) : "–";
      const tokens = this.metric["completion-tokens"];
      if (exact) {
        tokens.textContent = String(outputTokens);
        tokens.title = "exact count from the server's usage report";
      } else if (this.chunks) {
        tokens.textContent = "~" + outputTokens;
        tokens.title = "estimated from streamed chunks; the exact count arrives at the end";
      } else {
        tokens.textContent = "–";
      }
      this.metric.elapsed.textContent = this.t0 ? formatMs(now - this.t0) : "–";
      this.metric.finish.textContent = this.finish || (this.state === "stopped" ? "stopped" : "–");
    }

    // Stream one chat completion into this column. Resolves when the stream is over.
    async stream(body, signal) {
      this.t0 = performance.now();
      this.setState("waiting", "waiting");
      let resp;
      try {
        resp = await fetch("v1/chat/completions", {
          method: "POST",
          headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
          body: JSON.stringify(body),
          signal,
          cache: "no-store",
        });
      } catch (e) {
        this.ended(e, signal);
        return;
      }
      if (!resp.ok) {
        this.showError(await readError(resp));
        return;
      }
      if (!resp.body) {
        this.showError({ message: "This browser cannot read streamed responses." });
        return;
      }
      this.setState("streaming", "streaming");
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let data = [];
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (signal.aborted) throw new DOMException("Stopped", "AbortError"); // nothing shows after Stop
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let newline;
          while ((newline = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, newline).replace(/\r$/, "");
            buffer = buffer.slice(newline + 1);
            if (line === "") {
              // A blank line ends one server-sent event.
              if (data.length) this.onEvent(data.join("\n"));
              data = [];
            } else if (line.startsWith("data:")) {
              data.push(line.slice(5).replace(/^ /, ""));
            } // comments (":") and other fields (event:, id:, retry:) are ignored
          }
        }
        buffer += decoder.decode();
        if (buffer.startsWith("data:")) data.push(buffer.slice(5).replace(/^ /, ""));
        if (data.length) this.onEvent(data.join("\n"));
      } catch (e) {
        this.ended(e, signal);
        return;
      }
      if (this.state === "error") return;
      if (this.sawDone || this.finish) this.setState("done", "done");
      else this.showError({ message: "The stream ended before the server finished the answer." });
    }

    onEvent(data) {
      if (data === "[DONE]") {
        this.sawDone = true;
        return;
      }
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch (_) {
        return; // not a JSON event: nothing to show
      }
      if (chunk.error) {
        // An error can arrive mid-stream as `data: {"error": {...}}`, then `data: [DONE]`.
        const error = typeof chunk.error === "object" ? chunk.error : { message: String(chunk.error) };
        this.showError({ status: error.code && /^\d{3}$/.test(String(error.code)) ? Number(error.code) : null,
                         message: error.message || "The server reported an error.",
                         type: error.type, code: error.code });
        return;
      }
      const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
      if (choice) {
        const delta = choice.delta || {};
        const content = typeof delta.content === "string" ? delta.content : (choice.text || "");
        if (content) {
          const now = performance.now();
          if (this.tFirst == null) this.tFirst = now;
          this.tLast = now;
          this.chunks += 1;
          this.append(content);
        }
        if (choice.finish_reason) this.finish = choice.finish_reason;
      }
      if (chunk.usage) this.usage = chunk.usage;
    }

    // The fetch or the body read threw: either Stop aborted it or the connection failed.
    ended(e, signal) {
      if (signal.aborted || (e && e.name === "AbortError")) {
        if (this.active) this.setState("stopped", "stopped");
        return;
      }
      this.showError({ message: "The connection failed: " + (e && e.message ? e.message : String(e)) });
    }
  }

  // ---- sending and stopping -----------------------------------------------------------

  function showComposeError(message, field) {
    el.composeError.textContent = message;
    el.composeError.hidden = false;
    if (field) field.focus();
  }

  function readNumber(input, name, { min, max, integer }) {
    const raw = input.value.trim();
    if (raw === "") return { value: undefined };
    const value = Number(raw);
    if (!isFinite(value) || (integer && !Number.isInteger(value))) {
      return { error: name + " must be " + (integer ? "a whole number." : "a number.") };
    }
    if ((min != null && value < min) || (max != null && value > max)) {
      return { error: name + " must be between " + min + " and " + (max != null ? max : "any") + "." };
    }
    return { value };
  }

  function buildRequest() {
    if (!selected.length) return showComposeError("Choose at least one model.", el.modelList.querySelector("input"));
    const prompt = el.prompt.value;
    if (!prompt.trim()) return showComposeError("Write a prompt first.", el.prompt);
    const fields = [
      ["temperature", el.temperature, "Temperature", { min: 0, max: 2 }],
      ["top_p", el.topP, "Top p", { min: 0, max: 1 }],
      ["max_tokens", el.maxTokens, "Max tokens", { min: 1, integer: true }],
    ];
    const params = {};
    for (const [key, input, name, limits] of fields) {
      const result = readNumber(input, name, limits);
      if (result.error) return showComposeError(result.error, input);
      if (result.value !== undefined) params[key] = result.value;
    }
    let extra = {};
    if (el.extra.value.trim()) {
      try {
        extra = JSON.parse(el.extra.value);
      } catch (e) {
        extra = null;
      }
      if (!extra || typeof extra !== "object" || Array.isArray(extra)) {
        el.extra.closest("details").open = true;
        return showComposeError("Extra request fields must be a JSON object, like {\"seed\": 1}.", el.extra);
      }
    }
    const messages = [];
    if (el.system.value.trim()) messages.push({ role: "system", content: el.system.value });
    messages.push({ role: "user", content: prompt });
    el.composeError.hidden = true;
    // The page owns messages and streaming; everything else may be set in the extra fields.
    return Object.assign({}, params, extra,
                         { messages, stream: true, stream_options: { include_usage: true } });
  }

  function setRunning(running) {
    const focusWasOn = document.activeElement;
    el.send.disabled = running;
    el.stop.disabled = !running;
    // Keep keyboard focus on a usable control when a button becomes disabled.
    if (running && focusWasOn === el.send) el.stop.focus();
    if (!running && focusWasOn === el.stop) el.send.focus();
  }

  async function send() {
    if (run) return;
    const request = buildRequest();
    if (!request) return;
    const controller = new AbortController();
    const columns = selected.map((model, i) => new Column(model, i));
    el.results.replaceChildren(...columns.map((c) => c.root));
    el.results.style.setProperty("--columns", String(columns.length));
    run = { controller, columns, started: performance.now() };
    run.timer = setInterval(() => columns.forEach((c) => c.active && c.render()), TICK_MS);
    setRunning(true);
    el.runStatus.textContent = "Streaming from " + columns.map((c) => c.model).join(", ") + "…";
    await Promise.allSettled(columns.map((c) => c.stream(Object.assign({}, request, { model: c.model }),
                                                         controller.signal)));
    clearInterval(run.timer);
    columns.forEach((c) => c.render());
    const elapsed = formatMs(performance.now() - run.started);
    const counts = {};
    const words = { done: "done", stopped: "stopped", error: "failed" };
    columns.forEach((c) => {
      const word = words[c.state] || c.state;
      counts[word] = (counts[word] || 0) + 1;
    });
    const summary = Object.entries(counts).map(([state, n]) => n + " " + state).join(", ");
    const how = controller.signal.aborted ? "Stopped after " : "Finished in ";
    el.runStatus.textContent = how + elapsed + ": " + summary + ".";
    run = null;
    setRunning(false);
  }

  function stop() {
    if (!run) return;
    // Aborting closes each HTTP connection, which cancels the engine request on the server.
    run.controller.abort();
    run.columns.forEach((c) => c.active && c.setState("stopped", "stopped"));
    el.runStatus.textContent = "Stopping…";
  }

  // ---- wiring ---------------------------------------------------------------------------

  el.keyInput.addEventListener("input", () => {
    apiKey = el.keyInput.value.trim();
  });
  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = el.keyInput.value.trim();
    loadModels();
  });
  el.compose.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  el.stop.addEventListener("click", stop);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape" && run) {
      event.preventDefault();
      stop();
    }
  });

  loadModels();
})();
