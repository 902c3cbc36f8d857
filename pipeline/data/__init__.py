"""The data layer: shard format and index, mixtures, the epoch plan, the streaming dataset and loader."""
