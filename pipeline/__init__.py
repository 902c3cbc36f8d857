"""Distributed large-batch contrastive pretraining (CLIP image-text, CLAP audio-text).

Run `python -m pipeline --help` for the commands.
"""

__version__ = "0.1.0"
