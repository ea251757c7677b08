"""Layer 3, data: the FlexMix-mini reader, the tokenizer and token shards."""
