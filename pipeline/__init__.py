"""Streaming real-time forecasting: Kafka ticks in, stacked-GRU forecasts out."""

__version__ = "0.1.0"
