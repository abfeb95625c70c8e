"""L2-aware backward bound propagation (the `l2prop` backend's engine)."""
