"""sharp_core: the distillation library behind the SHARP job service.

Usable on its own (`python -m sharp_core train SPEC --out DIR`); the service's worker
calls the same `sharp_core.train.loop.train` entry point.
"""

__version__ = "0.1.0"
