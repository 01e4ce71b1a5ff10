"""Prometheus metrics for ``run --metrics-port``, and the ``/healthz`` the service is judged by.

Everything lives on a private ``CollectorRegistry`` owned by one ``Metrics`` object the CLI
creates (no module-level metrics: tests and several workers in one process stay apart).
Exposed names (``queue_processor_`` prefix):

- ``items_total{outcome}``  items finished by outcome: done, failed, skipped (source row
  gone), retried (back to pending after a provider outage), lost (claim superseded)
- ``provider_requests_total{status}``  HTTP requests to the embedding API by status code
  (or ``timeout`` / ``error`` when no response arrived)
- ``tokens_total``  tokens the provider reported (estimated where it reported none)
- ``lease_reclaims_total``  expired leases of dead or stalled workers taken over by ours
- ``batch_seconds``  histogram of one batch from claim to acknowledgement
- ``queue_depth{status}``  queue rows by status (``inbox``: bulk-inserted keys not yet
  queued), refreshed by ``QueueDepthPoller``
- ``last_progress_timestamp_seconds``  Unix time of the worker loop's last claim or batch

``MetricsServer`` serves ``GET /metrics`` (Prometheus text format) and ``GET /healthz`` (200
``ok``, or 503 with the reason) on a daemon thread; it is started and closed explicitly
(``Metrics.serve`` wraps that in an async context manager). Its cost is bounded whatever
clients do: idle or slow connections hold no thread and are dropped after a timeout, handler
threads and open connections are capped (see ``MetricsServer``). Health is whatever callable
the CLI passes in; ``progress_check``, ``QueueDepthPoller.health`` and ``all_of`` are the
building blocks it combines.
"""

from __future__ import annotations

from queue_processor.metrics.health import QueueDepthPoller, all_of, progress_check
from queue_processor.metrics.registry import Metrics
from queue_processor.metrics.server import HealthCheck, MetricsServer

__all__ = [
    "HealthCheck",
    "Metrics",
    "MetricsServer",
    "QueueDepthPoller",
    "all_of",
    "progress_check",
]
