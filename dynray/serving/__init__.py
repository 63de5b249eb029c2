"""The serving logic that ``actors/`` wires into Ray Serve, all of it testable without Ray.

- :mod:`~dynray.serving.config` — the app's typed arguments (``AppArgs``) and deployment names
- :mod:`~dynray.serving.payload` — HTTP request decoding, limits and response models
- :mod:`~dynray.serving.split` — the A/B traffic split between served versions
- :mod:`~dynray.serving.scheduling` — device profiles, live load, path estimates, policies
- :mod:`~dynray.serving.partition` — the stage range one device runs, and its continuations
- :mod:`~dynray.serving.failover` — the ingress's request plan: retries, failover, degradation, error classes
- :mod:`~dynray.serving.tiers` — per-tier circuit breaker (failures counted per wave), load reports, call times
- :mod:`~dynray.serving.routing_state` — the tier view the ingress replicas share (merge and sync)
- :mod:`~dynray.serving.ingress` — what the HTTP endpoints answer: served plan, statuses, request ids
- :mod:`~dynray.serving.metrics` — metric names and tag keys, the metrics sink

Import the submodules directly; this package imports nothing.
"""
