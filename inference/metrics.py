"""Prometheus metrics of the inference engine (process-global by design)."""

from prometheus_client import Counter, Gauge, Histogram

BATCH_SECONDS = Histogram(
    "nlpstream_inference_batch_seconds",
    "Time one device spent on one batch (forward pass and copy back).",
    ["device"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_TEXTS = Histogram(
    "nlpstream_inference_batch_texts",
    "Texts per device batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_TOKENS = Histogram(
    "nlpstream_inference_batch_tokens",
    "Padded tokens per device batch.",
    buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
)
PADDING_SHARE = Histogram(
    "nlpstream_inference_padding_share",
    "Share of padded token positions in a batch that are padding.",
    buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
)
DEVICE_FAILURES = Counter(
    "nlpstream_inference_device_failures_total",
    "Batch attempts that failed on a device, by reason (error, nonfinite = NaN/inf output, oom).",
    ["device", "reason"],
)
BATCH_RETRIES = Counter(
    "nlpstream_inference_batch_retries_total",
    "Failed batches sent again: retry (same batch, device healthy), split (halves), device (its replica went down).",
    ["reason"],
)
ITEM_FAILURES = Counter(
    "nlpstream_inference_item_failures_total",
    "Inputs that failed alone, twice, on healthy devices and were reported as failed (dead-lettered by the job).",
)
REPLICA_UP = Gauge(
    "nlpstream_inference_replica_up",
    "1 while a device replica is in service, 0 while it is down and being probed with backoff.",
    ["device"],
)
DEVICE_TOKEN_CAP = Gauge(
    "nlpstream_inference_device_token_cap",
    "Padded-token cap of a device's batches after an out-of-memory error (absent: no cap).",
    ["device"],
)
FP32_AGREEMENT = Gauge(
    "nlpstream_inference_fp32_agreement",
    "Share of a fixed start-up sample whose label on this replica equals the fp32 label.",
    ["device"],
)
GUARD_RERUNS = Counter(
    "nlpstream_inference_guard_reruns_total",
    "Texts whose int8 margin was too small and were rerun through the bf16 guard graph (agreement guard).",
)
CACHE_REQUESTS = Counter(
    "nlpstream_inference_cache_requests_total",
    "Dedup cache look-ups by result (hit = served without inference).",
    ["result"],
)
QUEUE_DEPTH = Gauge(
    "nlpstream_inference_queue_depth",
    "Batches planned but not yet finished in the current classify call.",
)
TOKEN_BUDGET = Gauge(
    "nlpstream_inference_token_budget",
    "Current max_batch_tokens (changes when target_latency_ms is set).",
)
