"""Tests that start several processes (gloo ranks, launchers, the demo): each runs real training."""
