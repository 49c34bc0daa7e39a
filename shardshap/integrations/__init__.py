"""Integrations with training loops that shardshap does not own (built on Attributor's low-level API)."""
