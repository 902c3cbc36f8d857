"""Unit tests of pipeline.checkpoint."""
