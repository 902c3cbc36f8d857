"""Unit tests of pipeline.commands."""
