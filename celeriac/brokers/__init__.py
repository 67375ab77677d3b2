"""Brokers: move opaque message bytes between producers and workers. See `base.Broker`."""
