"""Building, verifying and listing WebDataset shards; the embedded synthetic sets."""
