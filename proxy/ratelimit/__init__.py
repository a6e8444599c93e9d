"""Rate limits that hold across every replica: policy, Redis and local backends."""
