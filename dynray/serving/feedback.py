"""Label feedback: clients send back true labels, the ingress learns from them.

``POST /v1/feedback {"request_id": ..., "label": 3}`` (or ``"labels": [...]``, one per sample
of that request; scope ``predict``) answers a label for an earlier predict answer. The
ingress keeps an :class:`AnswerRecord` of every answer for ``ttl_s``, and a
:class:`FeedbackBook` turns a label into

- **live accuracy per exit** (a sliding window of the latest labels of each exit), exported
  as ``dynray_live_accuracy{model_version, exit}`` with the raw counts in
  ``dynray_feedback_labels_total{model_version, exit, result}``;
- **the hybrid router's trust** ``rl_weight`` per served version (:class:`TrustWeight`, the
  rule the router bench uses), which the ingress sends with every hybrid request.

How a label scores the policy against the rules. A hybrid device traces, per sample, where
the policy overrode the thresholds (:class:`~dynray.routing.rules.RouteTrace`). Only those
samples are evidence; on them the reward of the hybrid's answer and of the rules' answer are

    reward = 1[prediction == label] - lambda_cost * cost(exit)

with ``cost(exit)`` the cost units of answering at that exit on the edge-first path. When the
policy went deeper than the rules would have, the rules' answer (the exit where they would
have stopped) was computed on the way, so both rewards are exact. When the policy stopped
earlier, the rules' answer was never computed: its correctness and cost are *estimated* by
the live accuracy and cost of the labelled answers that left deeper than that exit, shrunk
towards the model's validation accuracy at its last exit (``prior_samples`` pseudo-labels).
Degraded answers (the cloud was down) and other routers' answers only feed the accuracy.

Errors: an unknown (or expired) request id is 404, a label out of range or a wrong number of
labels 422, a second label for the same request 409. Pure Python, no Ray: with several
ingress replicas the book lives in the app's ``RoutingState`` deployment
(``actors/routing_state.py``), so any replica can take the label of any answer.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from dynray.errors import ConfigError, RequestError
from dynray.routing.hybrid import HybridConfig, TrustWeight
from dynray.routing.rules import POLICY_STOPPED_EARLY, POLICY_WENT_DEEPER

__all__ = ["FeedbackConfig", "AnswerRecord", "Labelled", "FeedbackBook", "FeedbackStore", "LocalFeedback", "SharedFeedback", "book_label", "exit_costs", "parse_feedback"]

MAX_FEEDBACK_BYTES = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class FeedbackConfig:
    """How long answers wait for labels, and how the book estimates what it cannot see."""

    ttl_s: float = 900.0
    """An answer can be labelled for this long after it was given."""
    max_records: int = 200_000
    """Answers kept at most (the oldest are dropped first)."""
    window: int = 500
    """Latest labels per (version, exit) behind the live accuracy."""
    prior_samples: float = 20.0
    """Weight, in labels, of the validation accuracy in the estimate of an answer the rules would have given deeper."""

    def __post_init__(self) -> None:
        if not (self.ttl_s > 0 and math.isfinite(self.ttl_s)) or self.max_records < 1 or self.window < 1 or self.prior_samples < 0:
            raise ConfigError("feedback needs ttl_s > 0, max_records >= 1, window >= 1 and prior_samples >= 0",
                              got=(self.ttl_s, self.max_records, self.window, self.prior_samples), fix="e.g. FeedbackConfig(ttl_s=900)")


@dataclass(frozen=True, kw_only=True, slots=True)
class AnswerRecord:
    """What the ingress remembers of one answered predict request (one entry per sample).

    Slotted: an ingress replica keeps up to ``max_records`` of them (about 0.5 kB each for a
    one-image request, so ~100 MB at the default 200,000)."""

    request_id: str
    version: str
    router: str
    exit: tuple[int, ...]
    pred: tuple[int, ...]
    degraded: tuple[bool, ...]
    override: tuple[int, ...] = ()
    """RouteTrace.override per sample (empty: no hybrid trace)."""
    rule_exit: tuple[int, ...] = ()
    rule_pred: tuple[int, ...] = ()
    num_classes: int
    exit_cost: tuple[float, ...]
    """Cost units of an answer at each exit (edge-first path)."""
    lambda_cost: float
    reference_accuracy: float
    """The version's validation accuracy at its last exit (the prior for answers the rules would have given deeper)."""
    at: float
    """Wall-clock time of the answer."""

    def __post_init__(self) -> None:
        n = len(self.exit)
        if not n or len(self.pred) != n or len(self.degraded) != n or any(len(t) not in (0, n) for t in (self.override, self.rule_exit, self.rule_pred)):
            raise ConfigError("an answer record needs one exit, prediction and degraded flag per sample", got=(n, len(self.pred), len(self.degraded)))


@dataclass(frozen=True)
class Labelled:
    """What one accepted label did."""

    version: str
    router: str
    exits: tuple[int, ...]
    correct: tuple[bool, ...]
    evidence: int
    """Samples that scored the policy against the rules (0: the weight did not move)."""
    rl_weight: float | None
    """The version's trust after this label (None: not a hybrid answer)."""
    accuracy: dict[int, float] = field(default_factory=dict)
    """Live accuracy of the exits this label touched, after it."""

    def to_dict(self) -> dict:
        return {"model_version": self.version, "router": self.router, "exit": list(self.exits), "correct": list(self.correct),
                "evidence": self.evidence, "rl_weight": self.rl_weight, "live_accuracy": {str(k): v for k, v in self.accuracy.items()}}


@dataclass
class _ExitStats:
    recent: deque = field(default_factory=deque)  # latest (correct, cost) labels
    n: int = 0
    correct: int = 0
    cost: float = 0.0


class FeedbackBook:
    """Answer records waiting for labels, live accuracy per exit and the hybrid's trust per version."""

    def __init__(self, cfg: FeedbackConfig = FeedbackConfig(), hybrid: HybridConfig = HybridConfig(), *, clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.hybrid, self.clock = cfg, hybrid, clock
        self._records: OrderedDict[str, AnswerRecord] = OrderedDict()
        self._labelled: OrderedDict[str, float] = OrderedDict()  # request id -> when it was labelled (for 409)
        self._trust: dict[str, TrustWeight] = {}
        self._exits: dict[tuple[str, int], _ExitStats] = {}

    # -- answers ------------------------------------------------------------------------
    def add(self, records: Sequence[AnswerRecord]) -> None:
        for r in records:
            self._records[r.request_id] = r
            self._records.move_to_end(r.request_id)
        self._expire()

    def _expire(self) -> None:
        old = self.clock() - self.cfg.ttl_s
        for book in (self._records, self._labelled):
            while book and (len(book) > self.cfg.max_records or _at(next(iter(book.values()))) < old):
                book.popitem(last=False)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._records or request_id in self._labelled

    # -- labels -------------------------------------------------------------------------
    def label(self, request_id: str, labels: Sequence[int]) -> Labelled:
        """Score the answer ``request_id`` with its true ``labels``; raises RequestError (404, 409, 422)."""
        self._expire()
        if request_id in self._labelled:
            raise RequestError("this request was already labelled", status=409, got=request_id, fix="send one label per answered request")
        rec = self._records.get(request_id)
        if rec is None:
            raise RequestError("unknown request id (never answered, or its answer is older than the feedback window)", status=404, got=request_id,
                               fix=f"send the X-Request-Id of a predict answer within {self.cfg.ttl_s:.0f} s")
        if len(labels) != len(rec.exit):
            raise RequestError("one label per sample of the answered request", status=422, got={"labels": len(labels), "samples": len(rec.exit)},
                               fix="send 'label' for a one-sample request, else 'labels' in the request's order")
        bad = [y for y in labels if not 0 <= y < rec.num_classes]
        if bad:
            raise RequestError("label out of range", status=422, got=bad[:5], fix=f"labels are class indices 0..{rec.num_classes - 1}")
        del self._records[request_id]
        self._labelled[request_id] = self.clock()
        y = torch.tensor(list(labels), dtype=torch.int64)
        pred = torch.tensor(rec.pred, dtype=torch.int64)
        correct = pred == y
        evidence, weight = self._score(rec, y, correct), None
        if rec.router == "hybrid":
            weight = self.trust(rec.version).value
        for k, ok, degraded in zip(rec.exit, correct.tolist(), rec.degraded, strict=True):
            if not degraded:
                self._count(rec.version, k, ok, rec.exit_cost[k])
        live = {k: sum(s.recent) / len(s.recent) for k in set(rec.exit) if (s := self._exits.get((rec.version, k))) is not None and s.recent}
        return Labelled(rec.version, rec.router, rec.exit, tuple(correct.tolist()), evidence, weight, live)

    def _score(self, rec: AnswerRecord, y: torch.Tensor, correct: torch.Tensor) -> int:
        """Move the version's trust with the samples where the policy overrode the rules; how many did."""
        if rec.router != "hybrid" or not rec.override:
            return 0
        cost = torch.tensor(rec.exit_cost, dtype=torch.float64)
        lam = rec.lambda_cost
        pol, rul = [], []
        for i, (o, k) in enumerate(zip(rec.override, rec.exit, strict=True)):
            if rec.degraded[i] or o not in (POLICY_STOPPED_EARLY, POLICY_WENT_DEEPER):
                continue
            pol.append(float(correct[i]) - lam * float(cost[k]))
            if o == POLICY_WENT_DEEPER:
                rul.append(float(rec.rule_pred[i] == int(y[i])) - lam * float(cost[rec.rule_exit[i]]))
            else:
                acc, c = self._deeper(rec, k)
                rul.append(acc - lam * c)
        if pol:
            self.trust(rec.version).observe(torch.tensor(pol), torch.tensor(rul))
        return len(pol)

    def _deeper(self, rec: AnswerRecord, k: int) -> tuple[float, float]:
        """Estimated (accuracy, cost) of an answer the rules would have given past exit ``k``."""
        m = self.cfg.prior_samples
        n = correct = 0
        cost = 0.0
        for j in range(k + 1, len(rec.exit_cost)):
            s = self._exits.get((rec.version, j))
            if s is not None:
                n, correct, cost = n + s.n, correct + s.correct, cost + s.cost
        prior_cost = rec.exit_cost[min(k + 1, len(rec.exit_cost) - 1)]
        return (correct + m * rec.reference_accuracy) / max(n + m, 1e-9), (cost + m * prior_cost) / max(n + m, 1e-9)

    def _count(self, version: str, k: int, ok: bool, cost: float) -> None:
        s = self._exits.setdefault((version, k), _ExitStats(recent=deque(maxlen=self.cfg.window)))
        s.recent.append(bool(ok))
        s.n, s.correct, s.cost = s.n + 1, s.correct + int(ok), s.cost + cost

    # -- state --------------------------------------------------------------------------
    def trust(self, version: str) -> TrustWeight:
        if version not in self._trust:
            self._trust[version] = TrustWeight(self.hybrid)
        return self._trust[version]

    def weights(self) -> dict[str, float]:
        """rl_weight per version that has had hybrid feedback."""
        return {v: t.value for v, t in self._trust.items()}

    def accuracy(self) -> dict[str, dict[str, dict]]:
        """version -> exit -> {live accuracy over the window, labels in it, labels in all}."""
        out: dict[str, dict[str, dict]] = {}
        for (v, k), s in sorted(self._exits.items()):
            out.setdefault(v, {})[str(k)] = {"accuracy": sum(s.recent) / len(s.recent), "window": len(s.recent), "labels": s.n}
        return out

    def status(self) -> dict:
        return {"waiting": len(self._records), "labelled": len(self._labelled), "rl_weight": self.weights(), "accuracy": self.accuracy()}


class FeedbackStore(Protocol):
    """Where an ingress replica keeps its answers and sends labels (one book, or a shared one)."""

    def remember(self, record: AnswerRecord) -> None: ...

    async def label(self, request_id: str, labels: Sequence[int]) -> Labelled: ...

    def weight(self, version: str) -> float | None:
        """The hybrid's learnt trust for ``version`` (None: no feedback yet)."""
        ...

    def status(self) -> dict: ...


class LocalFeedback:
    """One ingress replica's own book (an app with one ingress replica)."""

    def __init__(self, book: FeedbackBook) -> None:
        self.book = book

    def remember(self, record: AnswerRecord) -> None:
        self.book.add([record])

    async def label(self, request_id: str, labels: Sequence[int]) -> Labelled:
        return self.book.label(request_id, labels)

    def weight(self, version: str) -> float | None:
        return self.book.weights().get(version)

    def status(self) -> dict:
        return {"shared": False, **self.book.status()}


Send = Callable[[str, list[int], list[AnswerRecord]], Awaitable[dict]]
"""Sends (request id, labels, this replica's unsent records) to the shared book; answers
``{"labelled": Labelled}`` or ``{"status": 4xx, "error": str, "fix": str}``."""


class SharedFeedback:
    """The app's shared book (``RoutingState``), seen from one of several ingress replicas.

    Answers are buffered here and travel with the replica's next routing-state sync
    (:meth:`take_pending`), or with its next label, so the request path makes no remote call.
    A label for an answer another replica gave may arrive before that replica's sync: an
    unknown id is asked again once, ``retry_s`` later (about one sync period), before it is 404.
    """

    def __init__(self, send: Send, *, retry_s: float, max_pending: int = 10_000) -> None:
        self.send, self.retry_s, self.max_pending = send, retry_s, max_pending
        self.pending: list[AnswerRecord] = []
        self.weights: dict[str, float] = {}
        self.dropped = 0

    def remember(self, record: AnswerRecord) -> None:
        if len(self.pending) >= self.max_pending:  # the shared book is unreachable: keep the newest
            self.pending.pop(0)
            self.dropped += 1
        self.pending.append(record)

    def take_pending(self) -> list[AnswerRecord]:
        out, self.pending = self.pending, []
        return out

    def restore(self, records: list[AnswerRecord]) -> None:
        """Put back records a failed sync could not deliver."""
        self.pending = (records + self.pending)[-self.max_pending:]

    def apply(self, weights: Mapping[str, float]) -> None:
        self.weights = dict(weights)

    async def label(self, request_id: str, labels: Sequence[int]) -> Labelled:
        for attempt in range(2):
            sent = self.take_pending()
            try:
                got = await self.send(request_id, list(labels), sent)
            except BaseException:
                self.restore(sent)
                raise
            if "labelled" in got:
                done: Labelled = got["labelled"]
                if done.rl_weight is not None:
                    self.weights[done.version] = done.rl_weight
                return done
            if got["status"] != 404 or attempt:
                raise RequestError(got["error"], status=got["status"], got=request_id, fix=got.get("fix", ""))
            await asyncio.sleep(self.retry_s)  # another replica's answer may still be on its way
        raise AssertionError("unreachable")

    def weight(self, version: str) -> float | None:
        return self.weights.get(version)

    def status(self) -> dict:
        return {"shared": True, "rl_weight": dict(self.weights), "pending": len(self.pending), "dropped": self.dropped}


def book_label(book: FeedbackBook, request_id: str, labels: Sequence[int], records: Sequence[AnswerRecord]) -> dict:
    """The shared book's side of :data:`Send`: take the records, then the label (errors as data, not raised across Ray)."""
    book.add(records)
    try:
        return {"labelled": book.label(request_id, labels)}
    except RequestError as e:
        return {"status": e.status, "error": e.what, "fix": e.fix}


def _at(v: AnswerRecord | float) -> float:
    return v.at if isinstance(v, AnswerRecord) else v


def exit_costs(stage_macs: Sequence[float], exit_macs: Sequence[float], edge_stages: int, cost_per_mmac: Mapping[str, float]) -> tuple[float, ...]:
    """Cost units of an answer at each exit on the edge-first path: every stage and head run on the way.

    Stages ``< edge_stages`` run on the edge, the rest on the cloud.
    """
    if len(stage_macs) != len(exit_macs) or not stage_macs:
        raise ConfigError("one stage and one exit MAC count per exit", got=(len(stage_macs), len(exit_macs)))
    out, total = [], 0.0
    for k, (s, e) in enumerate(zip(stage_macs, exit_macs, strict=True)):
        total += (s + e) / 1e6 * cost_per_mmac["edge" if k < edge_stages else "cloud"]
        out.append(total)
    return tuple(out)


def parse_feedback(body: bytes) -> tuple[str, list[int]]:
    """``{"request_id": str, "label": int}`` or ``{"request_id": str, "labels": [int, ...]}`` -> (id, labels)."""
    import json

    if len(body) > MAX_FEEDBACK_BYTES:
        raise RequestError("feedback body too large", status=413, got=len(body), fix=f"send at most {MAX_FEEDBACK_BYTES} bytes")
    try:
        d = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError("feedback body is not JSON", status=400, got=str(e)[:100], fix='send {"request_id": "...", "label": 3}') from None
    if not isinstance(d, dict) or not isinstance(d.get("request_id"), str) or not d["request_id"]:
        raise RequestError("feedback needs a 'request_id' string", status=422, got=type(d).__name__ if not isinstance(d, dict) else d.get("request_id"),
                           fix="send the X-Request-Id header of the predict answer as request_id")
    if ("label" in d) == ("labels" in d):
        raise RequestError("send exactly one of 'label' (one sample) and 'labels' (one per sample)", status=422, got=sorted(d), fix='e.g. {"request_id": "...", "label": 3}')
    labels = [d["label"]] if "label" in d else d["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(y, int) and not isinstance(y, bool) for y in labels):
        raise RequestError("labels must be class indices (integers)", status=422, got=str(labels)[:100], fix="e.g. 'label': 3")
    unknown = sorted(set(d) - {"request_id", "label", "labels"})
    if unknown:
        raise RequestError("unknown feedback fields", status=422, got=unknown, fix="send request_id and label (or labels)")
    return d["request_id"], labels
