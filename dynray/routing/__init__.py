"""The learned router: environment, PPO training and export, hybrid rules + policy, benchmark.

Modules, one concept each:

- :mod:`~dynray.routing.features` — the observation layout shared by training and serving
- :mod:`~dynray.routing.costs` — what stop / continue / offload cost on the edge/cloud topology
- :mod:`~dynray.routing.cache` — cached exit outputs of a registered model (the training data)
- :mod:`~dynray.routing.env` — the gymnasium environment (RLlib trains on it)
- :mod:`~dynray.routing.rollout` — exact batched replay of any router over cached outputs
- :mod:`~dynray.routing.ppo` — RLlib ``PPOConfig`` builder, training loop, export to plain torch
- :mod:`~dynray.routing.policy` — the exported policy and its registry entry, tied to a model version
- :mod:`~dynray.routing.hybrid` — policy when sure, thresholds otherwise, with adaptive trust
- :mod:`~dynray.routing.rules` — the routers as device stop rules (the serving path; no RLlib)
- :mod:`~dynray.routing.tuning` — thresholds tuned per cost weight (the baseline)
- :mod:`~dynray.bench.curves`, :mod:`~dynray.bench.trace`, :mod:`~dynray.bench.router` — ``dynray bench router``

Import the submodules directly; this package imports nothing, so the serving path never
loads RLlib (only :mod:`~dynray.routing.ppo` does, inside its functions).
"""
