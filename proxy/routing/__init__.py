"""Cost-aware routing: model catalog, request classifier, policy, budgets."""
