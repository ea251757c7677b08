"""Layer 1, model: the HF classes and what FlexOlmo adds to them (router bias and masks, upcycling,
owner-only parametrizations, device). torch + transformers only."""
