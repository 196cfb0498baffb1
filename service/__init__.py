"""rightfoot-poller: Rightfoot balance batches as Kafka events, exactly once."""

__version__ = "0.1.0"
