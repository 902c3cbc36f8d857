"""Unit tests of pipeline.observe."""
