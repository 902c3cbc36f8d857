"""Unit tests of pipeline.bench."""
