"""Observing a run: metrics.jsonl and TensorBoard, plots, FLOPs and MFU."""
