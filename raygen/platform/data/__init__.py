"""Data: image sources, tokenized shards with their manifest and declared columns, the tokenize job."""
