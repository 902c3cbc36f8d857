"""Unit tests of pipeline.parallel."""
