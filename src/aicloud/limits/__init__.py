"""Rate limits: requests and tokens per minute, per key and per project."""
