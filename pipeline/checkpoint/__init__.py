"""Checkpoints: atomic save and prune, the start plan, resume checks, elastic (universal) load."""
