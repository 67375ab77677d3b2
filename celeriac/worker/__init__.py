"""The worker: fetch messages, run tasks in a pool, store outcomes, ack. See `worker.Worker`."""
