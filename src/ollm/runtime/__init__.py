"""Moving bytes on one device: pinned host memory and the layer prefetcher (streams, events)."""
