"""The jobs package: CLI, typed config, the stream and backfill jobs.

The only place that wires consumers, inference and sinks together, and the
only place that commits Kafka offsets.
"""
