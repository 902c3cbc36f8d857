"""Unit tests of pipeline.train."""
