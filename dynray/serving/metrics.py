"""Metric names and tag keys, defined once (exported by Serve replicas as ``ray_<name>``)."""

from __future__ import annotations

__all__ = ["REQUESTS", "SAMPLES", "ESCALATED", "DEGRADED", "FAILOVERS", "REJECTED", "LATENCY_MS", "TAG_VERSION", "TAG_PATH", "TAG_STATUS", "TAG_TIER", "LATENCY_BOUNDARIES_MS"]

REQUESTS = "dynray_requests_total"  # answered /v1/predict requests, tags: version, path
SAMPLES = "dynray_samples_total"  # samples answered, tags: version, tier
ESCALATED = "dynray_escalated_samples_total"  # samples the edge handed to the cloud, tags: version
DEGRADED = "dynray_degraded_samples_total"  # samples answered by an edge exit because the cloud was down, tags: version
FAILOVERS = "dynray_unavailable_total"  # requests answered 503 (no tier reachable)
REJECTED = "dynray_rejected_total"  # 4xx answers, tags: status
LATENCY_MS = "dynray_request_latency_ms"  # ingress-side latency histogram, tags: version

TAG_VERSION, TAG_PATH, TAG_STATUS, TAG_TIER = "model_version", "path", "status", "tier"
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
