"""What ``rayllm bench`` sends: the run configuration, prompt lengths and request bodies.

Prompt lengths. A prompt is a string of common English words. Without a tokenizer the
harness first sends two 1-token requests (16 and 400 words) and fits the server's
``usage.prompt_tokens = intercept + slope * words``; that fit includes what the server
adds (BOS, the chat template), so the *mean* prompt length hits ``--input-len`` and
single prompts vary by a few percent with the words drawn. With ``--tokenizer PATH`` each
prompt is cut to the exact token count (target minus the server's measured overhead).
The real lengths, as reported by the server, are in the result (``input_len``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from rayllm_app.bench.client import send_request

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"

# Plain words that most tokenizers encode as one token each (with the leading space).
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an "
    "each which she do how their if will up other about out many then them these so some "
    "her would make like him into time has look two more write go see number no way could "
    "people my than first water been call who oil its now find long down day did get come "
    "made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good sentence man think say great where help "
    "through much before line right too mean old any same tell boy follow came want show"
).split()


@dataclass
class BenchConfig:
    base_url: str = DEFAULT_BASE_URL
    model: str | None = None  # None: models[0], else the first model of GET /models
    # Non-empty: request i (and warm-up request i) goes to models[i % len(models)], e.g. the
    # adapters of one base; the calibration requests go to ``model``.
    models: list[str] = field(default_factory=list)
    api_key: str | None = None
    endpoint: str = "completions"  # completions | chat
    stream: bool = True
    concurrency: int = 1  # closed loop: workers; open loop: max in flight (0 = no cap)
    num_requests: int = 32
    request_rate: float | None = None  # requests/s (Poisson); None = closed loop
    max_duration: float = 300.0  # no request starts after this many seconds
    drain_timeout: float = 30.0  # then in-flight requests get this long before cancellation
    request_timeout: float = 300.0
    input_len: int | None = 128
    input_len_dist: str | None = None  # fixed:N | uniform:LO:HI | normal:MEAN:STD
    output_len: int | None = 64
    ignore_eos: bool = True
    continuous_usage: bool = True  # ask for usage on every chunk (vLLM extension)
    calibrate: bool = True  # measure tokens per prompt word with the server first
    tokenizer: str | None = None  # local tokenizer folder for exact prompt lengths
    warmup_requests: int = 1
    seed: int = 0
    temperature: float | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    progress: bool = False
    keep_requests: bool = False

    def validate(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError("endpoint must be 'completions' or 'chat'")
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if self.request_rate is None and self.concurrency < 1:
            raise ValueError("closed-loop runs need concurrency >= 1")
        if self.concurrency < 0:
            raise ValueError("concurrency must be >= 0")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError("request_rate must be > 0 (inf sends all at once)")
        if self.max_duration <= 0 or self.request_timeout <= 0 or self.drain_timeout < 0:
            raise ValueError("max_duration and request_timeout must be > 0, drain_timeout >= 0")
        if self.input_len is not None and self.input_len < 1:
            raise ValueError("input_len must be >= 1")
        if self.input_len_dist:
            parse_len_dist(self.input_len_dist)
        if self.output_len is not None and self.output_len < 1:
            raise ValueError("output_len must be >= 1")
        if self.warmup_requests < 0:
            raise ValueError("warmup_requests must be >= 0")
        if not all(isinstance(m, str) and m for m in self.models):
            raise ValueError("models must be non-empty model ids")

    def public_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["api_key"] = "***" if self.api_key else None
        return data


def parse_len_dist(spec: str):
    """``fixed:N``, ``uniform:LO:HI`` or ``normal:MEAN:STD`` -> sampler(rng) -> int >= 1."""
    parts = spec.split(":")
    kind = parts[0].lower()
    try:
        nums = [float(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"bad length distribution {spec!r}") from None
    if kind == "fixed" and len(nums) == 1 and nums[0] >= 1:
        n = int(nums[0])
        return lambda rng: n
    if kind == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
        lo, hi = int(nums[0]), int(nums[1])
        return lambda rng: rng.randint(lo, hi)
    if kind == "normal" and len(nums) == 2 and nums[0] >= 1 and nums[1] >= 0:
        mean, std = nums
        return lambda rng: max(1, int(round(rng.gauss(mean, std))))
    raise ValueError(f"bad length distribution {spec!r}: use fixed:N, uniform:LO:HI or normal:MEAN:STD")


def normalize_base_url(url: str) -> str:
    url = url.rstrip("/")
    if url.count("/") == 2:  # http://host:port with no path: assume the OpenAI prefix
        url += "/v1"
    return url


def endpoint_url(cfg: BenchConfig) -> str:
    path = "/chat/completions" if cfg.endpoint == "chat" else "/completions"
    return normalize_base_url(cfg.base_url) + path


def build_payload(
    cfg: BenchConfig, model: str, prompt: str, *, max_tokens: int | None = None, stream: bool | None = None
) -> dict[str, Any]:
    stream = cfg.stream if stream is None else stream
    body: dict[str, Any] = {"model": model, "stream": stream}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    tokens = max_tokens if max_tokens is not None else cfg.output_len
    if tokens is not None:
        body["max_tokens"] = tokens
        if cfg.ignore_eos:
            body["ignore_eos"] = True  # vLLM extension: always generate max_tokens
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    if stream:
        opts = {"include_usage": True}
        if cfg.continuous_usage:
            opts["continuous_usage_stats"] = True
        body["stream_options"] = opts
    body.update(cfg.extra_body)
    return body


def request_models(cfg: BenchConfig, model: str, count: int) -> list[str]:
    """The model of each of ``count`` requests: ``cfg.models`` in turn, else ``model``."""
    names = cfg.models or [model]
    return [names[i % len(names)] for i in range(count)]


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))


async def discover_model(session: aiohttp.ClientSession, cfg: BenchConfig) -> str:
    async with session.get(normalize_base_url(cfg.base_url) + "/models") as resp:
        resp.raise_for_status()
        data = (await resp.json(content_type=None)).get("data") or []
    if not data:
        raise RuntimeError(f"{cfg.base_url}/models lists no model; pass --model")
    return data[0]["id"]


@dataclass
class Calibration:
    intercept: float  # server prompt tokens for zero words (BOS, chat template)
    tokens_per_word: float
    overhead: int | None = None  # server tokens minus local tokenizer tokens (with --tokenizer)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer  # optional, only for --tokenizer

    return AutoTokenizer.from_pretrained(path)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


async def calibrate(session, cfg: BenchConfig, model: str, tokenizer=None) -> Calibration | None:
    """Fit the server's prompt tokens against prompt words with non-streaming 1-token
    requests (16 and 400 words; 16 and 144 if the long one is refused, e.g. by a short
    context). None when the server reports no usage or refuses both."""
    rng = random.Random(cfg.seed + 7919)

    async def measure(words: int):
        text = make_prompt(rng, words)
        payload = build_payload(cfg, model, text, max_tokens=1, stream=False)
        rec = await send_request(
            session, endpoint_url(cfg), payload, index=-1, run_start=time.perf_counter(), stream=False
        )
        return rec, text

    short, short_text = await measure(16)
    if not short.ok:
        raise RuntimeError(f"calibration request failed: {short.error}")
    if short.prompt_tokens is None:
        return None
    for words in (400, 144):
        long, _ = await measure(words)
        if long.ok and long.prompt_tokens is not None:
            slope = (long.prompt_tokens - short.prompt_tokens) / (words - 16)
            if slope <= 0:
                return None
            overhead = short.prompt_tokens - _count(tokenizer, short_text) if tokenizer is not None else None
            return Calibration(short.prompt_tokens - slope * 16, slope, overhead)
    return None


def plan_prompts(cfg: BenchConfig, count: int, fit: Calibration | None, tokenizer=None) -> list[str]:
    """``count`` prompts whose lengths follow --input-len / --input-len-dist."""
    rng = random.Random(cfg.seed)
    sampler = parse_len_dist(cfg.input_len_dist) if cfg.input_len_dist else None
    intercept, slope = (fit.intercept, fit.tokens_per_word) if fit else (0.0, 1.0)
    prompts = []
    for _ in range(count):
        target = sampler(rng) if sampler else (cfg.input_len or 128)
        if tokenizer is None:
            prompts.append(make_prompt(rng, int(round((target - intercept) / slope))))
            continue
        want = max(1, target - (fit.overhead if fit and fit.overhead is not None else 0))
        text = make_prompt(rng, int(math.ceil(want / min(slope, 1.0))) + 8)
        ids = tokenizer.encode(text, add_special_tokens=False)[:want]
        prompts.append(tokenizer.decode(ids))
    return prompts
