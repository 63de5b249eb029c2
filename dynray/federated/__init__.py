"""Federated learning across device actors: plain torch, no Ray (``actors/federated.py`` wires it).

- :mod:`~dynray.federated.split` — non-IID client shards (a Dirichlet split of the labels)
- :mod:`~dynray.federated.codec` — updates as bytes: dense, top-k sparsified or 8-bit, with error feedback
- :mod:`~dynray.federated.secagg` — secure aggregation with pairwise masks that cancel in the sum
- :mod:`~dynray.federated.client` — one client's local round (train from the global weights, encode the update)
- :mod:`~dynray.federated.server` — the server's side: broadcast with a checksum, FedAvg, the round's record
"""
