"""Data: the embedded FlexMix-mini corpus, the shared tokenizer, and token shards."""
