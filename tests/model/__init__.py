"""Unit tests of pipeline.model."""
