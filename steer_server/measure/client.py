"""The evaluation's only way to a server: its HTTP API (any running steer-server).

Completions come back with their token ids (vLLM's ``return_token_ids``), so fluency is
scored on exactly the tokens that were sampled: the prompt's ids followed by the
completion's ids, sent back unsteered with ``prompt_logprobs`` (vLLM returns, per prompt
position, the log-probability of the token that stands there).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx

from steer_server.client import VECTORS_PATH as VECTORS


class EvalError(Exception):
    """The server refused or failed a request the evaluation needs (``status``: the HTTP
    status it answered, None when no answer came)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled (the same for every cell of a sweep)."""

    max_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 0.3
    repetition_penalty: float | None = 1.2
    samples: int = 8  # completions per prompt (the request's ``n``)
    # Per-prompt request seeds, so every cell draws the same random numbers. Off by default:
    # vLLM 0.32's CPU runner kills the engine when a seeded request's prefill is split over
    # steps (``_bookkeeping_sync`` rewinds the request's generator with ``set_offset``, which
    # CPU generators do not have: "CPU Generator does not use offset").
    seeded: bool = False

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                                "top_p": self.top_p, "n": self.samples}
        if self.repetition_penalty is not None:
            body["repetition_penalty"] = self.repetition_penalty
        return body


DOCUMENT_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class DocumentStart:
    ids: tuple[int, ...]  # what a text's first token is predicted from (empty: nothing)
    text: str  # what to write in front of a prompt to start it there ("" when the tokenizer adds ``ids``)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]


class SteerClient:
    """Async client of one server: completions, prompt log-probabilities, vector routes."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 900,
                 transport: httpx.AsyncBaseTransport | None = None):
        """``transport``: e.g. ``httpx.ASGITransport(app)`` to drive a server's app in-process."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.model = model

    async def __aenter__(self) -> SteerClient:
        if self.model is None:
            models = await self._json("GET", "/v1/models")
            if not models.get("data"):
                raise EvalError(f"{self.url} serves no model")
            self.model = models["data"][0]["id"]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def _json(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise EvalError(f"{method} {self.url}{path}: {exc!r}") from None
        if response.status_code >= 400:
            raise EvalError(f"{method} {path}: HTTP {response.status_code}: {_message(response)}", response.status_code)
        return response.json()

    async def complete(self, prompt: str, sampling: Sampling, seed: int | None, steering: dict | None) -> list[Completion]:
        """``sampling.samples`` completions of ``prompt`` (a raw completion, no chat template);
        ``seed`` is used when ``sampling.seeded``."""
        body = {"model": self.model, "prompt": prompt, "return_token_ids": True, **sampling.body()}
        if sampling.seeded and seed is not None:
            body["seed"] = seed
        if steering is not None:
            body["steering"] = steering
        data = await self._json("POST", "/v1/completions", json=body)
        choices = sorted(data["choices"], key=lambda c: c["index"])
        return [Completion(c["text"], c["prompt_token_ids"], c["token_ids"]) for c in choices]

    async def prompt_logprobs(self, prompts: list[list[int]] | list[str], steering: dict | None = None) -> list[list[float]]:
        """Per prompt (token ids or text), the log-probability of each token after the first
        given those before it (one value fewer than the prompt has tokens), under
        ``steering`` (None: the plain model)."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0, "return_token_ids": True}
        if steering is not None:
            body["steering"] = steering
        data = await self._json("POST", "/v1/completions", json=body)
        out = []
        for choice in sorted(data["choices"], key=lambda c: c["index"]):
            ids, positions = choice.get("prompt_token_ids"), choice.get("prompt_logprobs")
            if ids is None or positions is None or len(positions) != len(ids):
                raise EvalError("the server returned no prompt log-probabilities (is it a vLLM-based steer-server?)")
            out.append([positions[i][str(token)]["logprob"] for i, token in enumerate(ids) if i > 0])
        return out

    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """The served tokenizer's ids for ``text`` (vLLM's ``/tokenize``)."""
        body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        return (await self._json("POST", "/tokenize", json=body))["tokens"]

    async def document_start(self) -> DocumentStart:
        """Where a text starts when nothing precedes it: the tokens the tokenizer puts in front
        of any text itself (a BOS), else the one-token document separator ``<|endoftext|>``
        where the vocabulary has one (GPT-2, SmolLM2 and Qwen2 add no BOS; they saw that token
        between pre-training documents), else nothing."""
        plain, special = await self.tokenize("Hello", False), await self.tokenize("Hello", True)
        if len(special) > len(plain):  # what a causal LM's tokenizer adds goes in front
            return DocumentStart(tuple(special[:len(special) - len(plain)]), "")
        separator = await self.tokenize(DOCUMENT_SEPARATOR, False)
        return DocumentStart(tuple(separator), DOCUMENT_SEPARATOR) if len(separator) == 1 else DocumentStart((), "")

    # -- vector routes
    async def create_vector(self, body: dict) -> dict:
        return await self._json("POST", VECTORS, json=body)

    async def vector(self, name_or_id: str, norms: bool = False) -> dict:
        return await self._json("GET", f"{VECTORS}/{name_or_id}", params={"norms": "true"} if norms else None)

    async def num_layers(self) -> int:
        """The served model's decoder block count: the vector routes name the valid layer
        range when refusing one outside it (nothing is stored by the refused request)."""
        response = await self.http.post(VECTORS, json={"layers": {"1000000": [0.0]}})
        match = re.search(r"outside 0\.\.(\d+)", _message(response)) if response.status_code == 400 else None
        if match is None:
            raise EvalError(f"could not learn the served model's layer count from {self.url} "
                            f"(HTTP {response.status_code}: {_message(response)}); give the layers explicitly")
        return int(match.group(1))


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        return str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        return response.text[:500]
