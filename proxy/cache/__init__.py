"""Response cache: exact, normalized and semantic tiers."""
