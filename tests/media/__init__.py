"""Unit tests of pipeline.media."""
