"""The schema registry gate of the stream job: schema ids are fetched before a poll's records are accepted.

A registry that does not answer is no fault of the records: nothing of
them is accepted, dead-lettered or committed; their partitions are put back
(sought to their first record and paused) until the next try.
"""

from __future__ import annotations

import logging

from nlpstream.consumers import InputRecord
from nlpstream.consumers.schema_registry import RegistryDecoder, SchemaRegistryUnavailable
from nlpstream.jobs import metrics
from nlpstream.jobs.liveness import Liveness
from nlpstream.jobs.shared import LOGGER_NAME, TP, SharedState

log = logging.getLogger(LOGGER_NAME)


class RegistryGate:
    """Schema'd input: ids are fetched before a poll's records are accepted; an outage puts them back."""

    def __init__(self, state: SharedState, registry: RegistryDecoder, liveness: Liveness) -> None:
        self._state = state
        self.config = state.config
        self._registry = registry
        self._liveness = liveness
        self._registry_down_since: float | None = None
        self._registry_retry_at = 0.0
        self._registry_backoff = 0.0

    def resolve(self, records: list[InputRecord], now: float) -> list[InputRecord]:
        """Fetch the schema ids of a poll not seen yet; during a registry outage put the records back.

        A registry that does not answer is no fault of the records: nothing
        of them is accepted, dead-lettered or committed; their partitions
        are sought back to the first of them and paused, and fetching
        resumes after a backoff (0.5 s doubling to ``retry_max_s``), when the
        ids are asked for again. One WARNING per outage, one INFO when it ends.
        """
        state = self._state
        if state.registry_paused and now >= self._registry_retry_at:
            state.registry_paused = False
            if not state.paused:
                state.input.resume(state.resumable())
                self._liveness.mark_progress(state.input.assignment())  # paused time is no fetch stall
        if not records:
            return records
        ids = self._registry.unresolved(r.value for r in records)
        if ids and self._registry_down_since is not None and now < self._registry_retry_at:
            self._put_back(records)  # e.g. a partition assigned during the outage: wait for the next try
            return []
        if ids:
            try:
                self._registry.resolve(ids)
            except SchemaRegistryUnavailable as exc:
                metrics.SCHEMA_REGISTRY_ERRORS.inc()
                metrics.SCHEMA_REGISTRY_OUTAGE.set(1)
                if self._registry_down_since is None:
                    self._registry_down_since = now
                    log.warning("%s; records with new schema ids wait (nothing of them is committed or "
                                "dead-lettered), retrying with backoff", exc)
                else:
                    log.debug("schema registry still down: %s", exc)
                self._registry_backoff = min(self.config.input.schema_registry.retry_max_s,
                                             max(0.5, self._registry_backoff * 2))
                self._registry_retry_at = now + self._registry_backoff
                self._put_back(records)
                return []
            if self._registry_down_since is not None:  # it answered: the outage is over
                log.info("the schema registry answers again after %.0fs", now - self._registry_down_since)
                self._registry_down_since = None
                self._registry_backoff = 0.0
                metrics.SCHEMA_REGISTRY_OUTAGE.set(0)
        return records

    def _put_back(self, records: list[InputRecord]) -> None:
        """Seek each partition of ``records`` back to its first record and pause fetching until the retry."""
        state = self._state
        first: dict[TP, int] = {}
        for r in records:
            first.setdefault((r.topic, r.partition), r.offset)
        with state.lock:
            owned = set(state.input.assignment())
            for (topic, partition), offset in first.items():
                if (topic, partition) in owned:
                    state.input.seek(topic, partition, offset)
            state.input.pause(owned)
            state.registry_paused = True
