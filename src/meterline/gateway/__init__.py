"""The LLM gateway: estimate, reserve, forward, stream and settle proxied model requests."""
