"""The server: what vLLM's OpenAI app gets from steer-server (``api.SteerApiPlugin``).

A steered request passes, in order: ``access`` (its key -> role and tenant), ``middleware``
(the ``steering`` field, quotas), ``steering`` (the typed field -> vector ids, checked by
``steer_vllm.validate``), ``render_hook`` (ActAdd lengths against the prompt vLLM renders),
then vLLM's handler and the engine plugin (``steer_vllm``). Routes of their own:
``vector_routes``, ``calibrate_route``, ``sweep_route``, ``playground``. Nothing here imports
the tooling (``steer_server.eval``, ``bench``, ``check``); sweeps and calibrations measure
with ``steer_server.measure``.
"""
