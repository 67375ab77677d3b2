"""The wire format: task messages, envelopes, serializers and stored failures. Nothing else knows it."""
