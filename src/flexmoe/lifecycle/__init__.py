"""Layer 7, lifecycle: the verbs that build models: anchor, expert (+ gate recipes, DP), merge,
router tuning, and the baselines FlexOlmo is compared with."""
