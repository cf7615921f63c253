"""``clip-worker bench``: model, preprocessing and end-to-end throughput, with the baseline, in one run."""
