"""Layer 8, evaluation: held-out BPB tables, downstream tasks, the memorisation audit and the
demo's measurements (typed results; rendering is the demo's)."""
