"""sagan: train, sample, evaluate and inspect Self-Attention GANs."""

import os as _os

__version__ = "0.2.0"
PARENT_PID = _os.getppid()  # recorded first thing: under torchrun, the launcher that `launcher.py` watches
