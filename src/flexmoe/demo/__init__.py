"""Layer 10, demo: `make demo` as resumable stages, and the report rendered from its results."""
