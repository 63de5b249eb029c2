"""The routing state the ingress replicas of one app share, as a Serve deployment: tier
health and load, and the label-feedback book.

One replica per app (``RoutingState``, bound into the graph by ``actors.app:build_app``
when the ingress has 2 or more replicas), so its lifetime is the app's and Serve replaces
it if it dies; the state is soft (every ingress replica pushes its view each period), so a
replacement is whole again within one period. Only wiring: the merge is
:class:`dynray.serving.routing_state.RoutingStateStore`.
"""

from __future__ import annotations

from dataclasses import replace

from dynray.routing.hybrid import HybridConfig
from dynray.serving.config import FeedbackArgs
from dynray.serving.feedback import AnswerRecord, FeedbackBook, book_label
from dynray.serving.routing_state import Observation, RoutingStateStore, SharedView

__all__ = ["RoutingState"]


class RoutingState:
    """Serve deployment: ``sync`` takes one ingress replica's observation and answers the merge."""

    def __init__(self, *, expire_s: float = 3.0, feedback: dict | None = None, hybrid: dict | None = None) -> None:
        self.store = RoutingStateStore(expire_s=expire_s)
        self.book = FeedbackBook(FeedbackArgs(**feedback).config(), HybridConfig(**(hybrid or {}))) if feedback is not None else None

    def sync(self, obs: Observation, records: list[AnswerRecord] | None = None) -> SharedView:
        """Take one replica's view (and its answers awaiting labels); answer the merge and the hybrid's trust."""
        view = self.store.push(obs)
        if self.book is None:
            return view
        self.book.add(records or [])
        return replace(view, rl_weight=self.book.weights())

    def label(self, request_id: str, labels: list[int], records: list[AnswerRecord]) -> dict:
        """A label for any replica's answer (``records``: the asking replica's unsent answers)."""
        if self.book is None:
            return {"status": 404, "error": "label feedback is off on this app", "fix": "serve with `feedback: {enabled: true}`"}
        return book_label(self.book, request_id, labels, records)

    def feedback_status(self) -> dict:
        return self.book.status() if self.book is not None else {"enabled": False}

    def view(self) -> SharedView:
        """The merged view without pushing (for tests and `serve status`-style inspection)."""
        return self.store.view()

    def replicas(self) -> list[str]:
        """Ingress replicas heard from within ``expire_s``."""
        return self.store.replicas()
