"""Unit tests of pipeline.shards."""
