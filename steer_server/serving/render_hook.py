"""The steering checks that need the prompt as vLLM renders it, run inside vLLM's own
rendering so that every prompt is rendered once.

ActAdd rows land on prompt positions ``anchor..anchor+k-1``: the prompt must reach that
far, and in a chat the anchor is the first token of the last user message
(``steer_server.serving.anchor``), so both wait for the templated prompt. vLLM's handlers render
it through ``OnlineRenderer`` before they build the sampling parameters and before any
stream starts; the wrapper here finds the anchor and checks the lengths right there, then
rewrites the request's ``vllm_xargs.steering`` with the anchor it found. A refusal is an
``ErrorResponse``, which vLLM's handlers already answer with its status (400 naming the
field) instead of starting a stream.

The checks travel on the request object itself (``SteeredChatCompletionRequest`` ... in
``steered_routes``, which vLLM's handler passes to its renderer) and are taken by its first
render, so a render of any other request, or a second render of this one, is left alone. A
request whose checks never ran still carries ``anchor_to``, and the engine's frontend
refuses it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from steer_server.serving.anchor import user_anchor
from steer_server.serving.steering import Resolved, SteeringError, bad_request
from steer_vllm.hooks import is_hooked, patch
from steer_vllm.spec import STEERING_KEY
from steer_vllm.vllm_internals import RENDER_METHODS  # the hooked names, in steer-server's one list of vLLM symbols

# OnlineRenderer method -> how to get the engine inputs out of what it returns
_ENGINE_INPUTS_OF: dict[str, Callable] = {
    "render_completion": lambda result: result,
    "render_chat": lambda result: result[1],
    "render_responses": lambda result: [result.engine_input],
}


@dataclass
class AwaitingPrompt:
    """A steered request whose ActAdd checks wait for its rendered prompt."""

    resolved: Resolved
    user_text: str | None  # anchor "user": the text of the last user message (None: there is none)
    decode: Callable[[list[int]], str]  # the tokenizer's decoding, special tokens kept
    on_checked: Callable[[], None]  # counts and logs the request as steered
    on_refused: Callable[[SteeringError], None]  # counts and logs the refusal

    def check(self, prompts: list[list[int]]) -> str:
        """The request's steering text with its anchor found in ``prompts`` (token ids as
        vLLM rendered them); raises ``SteeringError`` naming the field."""
        engine = self.resolved.engine
        anchor = 0
        if engine.anchor_to == "user" and prompts:
            if self.user_text is None:
                raise bad_request("steering.anchor", 'the request has no user message to anchor to; use "anchor": "template"')
            anchor = user_anchor(prompts[0], self.user_text, self.decode)
        self.resolved.engine = engine.model_copy(update={"anchor": anchor, "anchor_to": None})
        for prompt in prompts:
            self.resolved.check_prompt_length(len(prompt))
        return self.resolved.engine_json()


def _checked_render(engine_inputs_of: Callable):
    def make(original):
        @functools.wraps(original)
        async def render(self, request, *args, **kwargs):
            from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

            result = await original(self, request, *args, **kwargs)
            take_awaiting = getattr(request, "take_awaiting", None)  # a steered route's request
            awaiting = take_awaiting() if take_awaiting is not None else None
            if awaiting is None or isinstance(result, ErrorResponse):
                return result
            # Prompt embeddings carry no ids: the engine's frontend checks those lengths.
            prompts = [list(e["prompt_token_ids"]) for e in engine_inputs_of(result) if e.get("prompt_token_ids") is not None]
            try:
                request.vllm_xargs[STEERING_KEY] = awaiting.check(prompts)
            except SteeringError as exc:
                awaiting.on_refused(exc)
                return ErrorResponse(error=ErrorInfo(**exc.body()["error"]))
            awaiting.on_checked()
            return result

        return render

    return make


def install_render_hooks() -> None:
    from vllm.renderers.online_renderer import OnlineRenderer

    for name in RENDER_METHODS:
        patch(OnlineRenderer, name, _checked_render(_ENGINE_INPUTS_OF[name]))


def render_hook_problems(state) -> list[str]:
    """The render hooks missing on the renderers vLLM's handlers in ``state`` use."""
    found = []
    for handler_name in ("openai_serving_completion", "openai_serving_chat", "openai_serving_responses"):
        handler = getattr(state, handler_name, None)
        if handler is None:  # an endpoint this server does not serve
            continue
        renderer = getattr(handler, "online_renderer", None)
        if renderer is None:
            found.append(f"vLLM's {handler_name} has no online_renderer to check prompts with")
            continue
        found += [f"the render hook {type(renderer).__name__}.{name} is not installed"
                  for name in RENDER_METHODS if not is_hooked(type(renderer), name)]
    return found
