"""The programs on top of the library: train, demo, export/eval of a run, the launcher supervisor."""
