"""The towers: open_clip image-text models and the audio-text (CLAP) model; no training concerns."""
