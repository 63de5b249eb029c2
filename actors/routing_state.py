"""The routing state the ingress replicas of one app share, as a Serve deployment.

One replica per app (``RoutingState``, bound into the graph by ``actors.app:build_app``
when the ingress has 2 or more replicas), so its lifetime is the app's and Serve replaces
it if it dies; the state is soft (every ingress replica pushes its view each period), so a
replacement is whole again within one period. Only wiring: the merge is
:class:`dynray.serving.routing_state.RoutingStateStore`.
"""

from __future__ import annotations

from dynray.serving.routing_state import Observation, RoutingStateStore, SharedView

__all__ = ["RoutingState"]


class RoutingState:
    """Serve deployment: ``sync`` takes one ingress replica's observation and answers the merge."""

    def __init__(self, *, expire_s: float = 3.0) -> None:
        self.store = RoutingStateStore(expire_s=expire_s)

    def sync(self, obs: Observation) -> SharedView:
        return self.store.push(obs)

    def view(self) -> SharedView:
        """The merged view without pushing (for tests and `serve status`-style inspection)."""
        return self.store.view()

    def replicas(self) -> list[str]:
        """Ingress replicas heard from within ``expire_s``."""
        return self.store.replicas()
