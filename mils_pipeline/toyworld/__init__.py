"""The toy world: procedurally rendered scenes with exact captions, a small open_clip scorer
trained on them on the CPU, and the bundled checkpoints that make caption quality measurable
offline (`mils demo`, benchmarks/quality.py)."""
