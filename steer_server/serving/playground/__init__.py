"""The web playground at ``/playground``: steered and unsteered answers side by side, the vector
library, small sweeps.

This package's job: serve the page and its assets (``static/``, shipped in the package; the
page fetches nothing from elsewhere) behind the server's API keys. Everything the page *does*
goes through the public HTTP API with the user's key (completions and chat, the vector routes,
``/v1/steering/sweeps``), so the page can do nothing a client could not.

The page is outside ``/v1``, which vLLM's key check guards, so ``playground_router`` checks
keys itself: with inference keys configured, ``/playground`` answers 401 with a key form
(``static/login.html``) unless the request carries a valid key, as ``Authorization: Bearer``
or as the cookie the form sets (``PLAYGROUND_COOKIE``, path ``/playground``, SameSite=Strict).
The page reads that cookie to send the key on its API calls.
"""
from steer_server.serving.playground.routes import PLAYGROUND_COOKIE, PLAYGROUND_PATH, playground_router

__all__ = ["PLAYGROUND_COOKIE", "PLAYGROUND_PATH", "playground_router"]
