"""Benchmarks of the forecasting pipeline, each figure beside a baseline measured in the same run.

- ``engine``: :class:`pipeline.engine.Engine` alone (no Kafka) at 1k/10k/100k streams versus the
  naive design that steps the same model one tick at a time; plus decode throughput.
- ``e2e``: the daemon through an embedded Tansu broker versus a bare kafka-python passthrough on
  the same broker: throughput and end-to-end latency at an offered rate and at saturation.

Run ``python -m benchmarks [engine|e2e] [--quick] [--json PATH]``.
"""
