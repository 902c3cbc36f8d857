"""Unit tests of pipeline.eval."""
