"""What every HTTP client of a steer-server shares: where a server is by default, where its
vector routes are, how to authenticate, and how to read an error it answered.

The command-line clients (``steer_server.cli``), the bench and the locust file use these, so
a default or a path is written once.
"""
from __future__ import annotations

import argparse

from steer_server.settings import DEFAULT_URL, ClientSettings, load_client_settings

VECTORS_PATH = "/v1/steering/vectors"  # the one definition: the server's routes are declared under it too
SWEEPS_PATH = "/v1/steering/sweeps"
# A listing page (GET VECTORS_PATH?limit=&after=): its size unless asked, and the most one holds.
LIST_PAGE_DEFAULT = 100
LIST_PAGE_MAX = 1000
# A sweep or calibration the server runs for an HTTP caller shares the engine with everyone's
# requests: at most this many layer × strength cells (the CLI runs larger calibrations in parts).
MAX_CELLS = 24
# What a calibration tries by default. On the default model doses above ~0.3 cost more than a
# nat/token of fluency at every layer tried (EVALUATION.md, "First try"): the grid is fine
# where settings are usable.
DEFAULT_DOSES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)


def default_url() -> str:
    """``$STEER_SERVER_URL``, else ``steer_server.settings.DEFAULT_URL`` (``ClientSettings``)."""
    return load_client_settings().url


def default_api_key() -> str | None:
    """``$STEER_API_KEY``, else ``$OPENAI_API_KEY`` (``steer_server.settings.ClientSettings``)."""
    return load_client_settings().api_key


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The ``Authorization`` header vLLM's ``--api-key`` expects (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def error_message(response) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``), else the text."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return response.text[:500]
    return error.get("message") if isinstance(error, dict) else str(error)


def positions_arg(text: str) -> str | dict:
    """A named schedule, or ``START:END`` -> a window over generated tokens."""
    if text in ("all", "prompt", "generated", "after_anchor"):
        return text
    start, colon, end = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return {"start": int(start), **({"end": int(end)} if end.strip() else {})}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected all, prompt, generated, after_anchor or START:END, got {text!r}") from None


def client_args(parser: argparse.ArgumentParser, client: ClientSettings) -> None:
    """``--url`` and ``--api-key``, the same on every client command (defaults from ``client``)."""
    parser.add_argument("--url", default=client.url,
                        help=f"server address (default: ${ClientSettings.variable('url')} or {DEFAULT_URL})")
    parser.add_argument("--api-key", default=client.api_key,
                        help="the server's --api-key (default: $STEER_API_KEY or $OPENAI_API_KEY)")
