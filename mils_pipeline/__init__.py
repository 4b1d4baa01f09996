"""mils-pipeline: caption datasets from unlabeled media with MILS, no training.

Importing the package is cheap: heavy libraries (torch, open_clip, llama_cpp) load inside the
backend that needs them.
"""

__version__ = "0.1.0"
