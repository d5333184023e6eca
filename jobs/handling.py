"""How a Kafka record becomes a row or a dead letter: shared by the stream job and the Kafka backfill.

Pure helpers over plain data (no state): decoding a batch, the DLQ error
class and message of each kind of failure, and the output rows of labeled
records. Both jobs call these so that a record is decoded, dead-lettered and
written the same way whichever job reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import numpy as np

from nlpstream.consumers import DecodeError, DecodeSettings, InputRecord, decode_record
from nlpstream.consumers.decode import fast_json_fields, id_text
from nlpstream.consumers.records import DecodedText
from nlpstream.inference import Prediction
from nlpstream.sinks.chunks import columns_chunk

_VALUE, _F0, _F1 = attrgetter("value"), attrgetter("f0"), attrgetter("f1")
_LABEL, _SCORE = attrgetter("label"), attrgetter("score")
_TOPIC, _PARTITION, _OFFSET, _TIMESTAMP = (attrgetter("topic"), attrgetter("partition"), attrgetter("offset"),
                                           attrgetter("timestamp_ms"))
INFERENCE_REASON = "inference"  # the dead-letter reason of a text the model fails on alone


def decode_batch(records: list[InputRecord], settings: DecodeSettings
                 ) -> tuple[list[DecodedText], list[tuple[InputRecord, DecodeError]]]:
    """The records that carry usable text, and those that do not with why (in input order).

    Schema'd formats need every schema id of ``records`` resolved on
    ``settings.registry`` first.
    """
    good: list[DecodedText] = []
    undecodable: list[tuple[InputRecord, DecodeError]] = []
    for record in records:
        try:
            good.append(decode_record(record, settings))
        except DecodeError as exc:
            undecodable.append((record, exc))
    return good, undecodable


@dataclass(slots=True)
class DecodedBatch:
    """The records of a batch that carry usable text, as columns (what :class:`DecodedText` holds per record).

    ``fields_of(i)``: the kept top-level scalar fields of record ``i`` (alert keys), built only when asked.
    """

    records: list[InputRecord]
    ids: list[str]
    texts: list[str]
    _fields: list[Any]  # per record: a dict, or the fast decode's struct
    _keep: tuple[tuple[str, str], ...] = ()  # (field, the struct's attribute) of each kept field

    def __len__(self) -> int:
        return len(self.records)

    def fields_of(self, i: int) -> dict[str, Any]:
        fields = self._fields[i]
        if isinstance(fields, dict):
            return fields
        return {name: value for name, attr in self._keep
                if isinstance(value := getattr(fields, attr), (str, int, float, bool))}

    def select(self, keep: list[int]) -> DecodedBatch:
        """Only the records at ``keep`` (ascending indices)."""
        return DecodedBatch([self.records[i] for i in keep], [self.ids[i] for i in keep],
                            [self.texts[i] for i in keep], [self._fields[i] for i in keep], self._keep)

    @classmethod
    def of(cls, good: list[DecodedText]) -> DecodedBatch:
        return cls([d.record for d in good], [d.id for d in good], [d.text for d in good], [d.fields for d in good])


def decode_columns(records: list[InputRecord], settings: DecodeSettings
                   ) -> tuple[DecodedBatch, list[tuple[InputRecord, DecodeError]]]:
    """:func:`decode_batch` as columns: the same records, ids, texts, fields and errors, in input order.

    Plain JSON objects whose text and id fields are top-level keys take one
    msgspec struct decode per record (:func:`~nlpstream.consumers.decode.fast_json_fields`)
    and checks per column; any record that fails a check, and every record
    of a batch the fast decode refuses, goes through :func:`decode_record`,
    so ids, errors and their messages stay exactly what it gives.
    """
    keep = settings.keep_fields
    fast = (settings.input_format == "json" and settings.registry is None and keep is not None
            and "." not in settings.text_field and "." not in settings.id_field and records)
    names = tuple(dict.fromkeys((settings.text_field, settings.id_field, *(keep or ()))))
    objs = fast_json_fields(list(map(_VALUE, records)), names) if fast else None
    if objs is None:
        good, undecodable = decode_batch(records, settings)
        return DecodedBatch.of(good), undecodable
    texts = list(map(_F0, objs))
    ids = texts if settings.id_field == settings.text_field else list(map(_F1, objs))
    if not all(type(d) is str for d in ids):  # an integer id is its decimal string (bool is no id)
        ids = [id_text(d) if type(d) is int else d for d in ids]  # None (too long to print): fixed below
    attrs = {name: f"f{k}" for k, name in enumerate(names)}
    kept = tuple((name, attrs[name]) for name in dict.fromkeys(keep or ()) if name != settings.text_field)
    # usable: a non-blank string text (``strip`` removes exactly what ``isspace`` tests) and a non-empty string id
    bad = [i for i, (t, d) in enumerate(zip(texts, ids))
           if type(t) is not str or not t or t.isspace() or type(d) is not str or not d]
    if not bad:
        return DecodedBatch(records, ids, texts, objs, kept), []
    good_at: list[int] = []
    undecodable: list[tuple[InputRecord, DecodeError]] = []
    fixed: dict[int, DecodedText] = {}
    bad_set = set(bad)
    for i in bad:
        try:
            fixed[i] = decode_record(records[i], settings)
        except DecodeError as exc:
            undecodable.append((records[i], exc))
    for i in range(len(records)):
        if i not in bad_set or i in fixed:
            good_at.append(i)
    out_ids = [fixed[i].id if i in fixed else ids[i] for i in good_at]
    fields = [fixed[i].fields if i in fixed else objs[i] for i in good_at]
    out_texts = [fixed[i].text if i in fixed else texts[i] for i in good_at]
    return DecodedBatch([records[i] for i in good_at], out_ids, out_texts, fields, kept), undecodable


@dataclass(slots=True)
class LabeledColumns:
    """A batch's labeled records as columns: their rows as one Arrow table (:mod:`nlpstream.sinks.chunks`), and
    the labels, scores, event times and further heads the alert rules read."""

    chunk: Any  # pa.Table
    labels: list[str]
    scores: list[float]
    event_times: Any  # np.ndarray of int64 milliseconds
    heads: dict[str, tuple[list[str], list[float]]]


def labeled_columns(good: DecodedBatch, results: list[Prediction], processed_at_ms: int, model: str,
                    one_topic: bool = False) -> LabeledColumns:
    """The rows of labeled records (the columns of :class:`~nlpstream.sinks.OutputRow`), built a column at a time.

    The event time is the record's Kafka timestamp, or ``processed_at_ms`` when it has none; the first
    result names the further heads. ``one_topic``: the caller knows every record is of the first one's topic.
    """
    records = good.records
    labels = list(map(_LABEL, results))
    scores = list(map(_SCORE, results))
    event_times = np.fromiter(map(_TIMESTAMP, records), dtype=np.int64, count=len(records))
    event_times[event_times == 0] = processed_at_ms  # no Kafka timestamp: the time it was handled
    heads: dict[str, tuple[list[str], list[float]]] = {}
    names = list(getattr(results[0], "heads", None) or ()) if results else []
    for name in names:
        each = [r.heads[name] for r in results]  # type: ignore[attr-defined]
        heads[name] = ([h.label for h in each], [h.score for h in each])
    topics = records[0].topic if one_topic else list(map(_TOPIC, records))
    chunk = columns_chunk(topics, list(map(_PARTITION, records)), list(map(_OFFSET, records)), good.ids, good.texts,
                          labels, scores, event_times, processed_at_ms, model, heads)
    return LabeledColumns(chunk, labels, scores, event_times, heads)


def split_failed(good: DecodedBatch, results: list[Prediction | BaseException]
                 ) -> tuple[list[tuple[InputRecord, BaseException]], DecodedBatch, list[Prediction]]:
    """(the records whose text failed inference alone, with the error; the others; their predictions)."""
    failed = [i for i, result in enumerate(results) if isinstance(result, BaseException)]
    if not failed:
        return [], good, results  # type: ignore[return-value]
    failed_set = set(failed)
    keep = [i for i in range(len(results)) if i not in failed_set]
    return ([(good.records[i], results[i]) for i in failed],  # type: ignore[misc]
            good.select(keep), [results[i] for i in keep])  # type: ignore[misc]


def decode_failure(exc: DecodeError) -> tuple[str, str, str]:
    """(DLQ error class header, DLQ message header, metrics reason) of a record that cannot be decoded."""
    return f"DecodeError:{exc.kind}", str(exc), exc.kind


def inference_failure(exc: BaseException) -> tuple[str, str, str]:
    """(DLQ error class header, DLQ message header, metrics reason) of a text the model fails on alone."""
    return type(exc).__name__, f"classification failed: {exc}", INFERENCE_REASON
