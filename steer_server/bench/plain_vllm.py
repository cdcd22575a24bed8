"""Plain vLLM's ``serve``, the baseline the plugin is compared with:
``python -m steer_server.bench.plain_vllm MODEL [vLLM serve flags]``. Start it with
``VLLM_PLUGINS=""`` so that no plugin at all is loaded."""
from __future__ import annotations

import sys

from steer_server.vllm_serve import run_vllm_serve

if __name__ == "__main__":
    run_vllm_serve(sys.argv[1:])
