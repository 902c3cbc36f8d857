"""Leaf helpers every layer may use: errors and exit statuses, config filling, named random streams, storage access."""
