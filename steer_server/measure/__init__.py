"""Measuring steering through a running server's HTTP API: the client, the datasets, the
metrics, the steerings a sweep tries and the resumable sweep itself.

Shared by the server's own sweep and calibration routes (``steer_server.serving``) and by
the tooling (``steer-server eval``, ``steer_server.eval``), which adds the paper's
experiments and the reports.
"""
