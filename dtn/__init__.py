"""DTN: Deep Multiple Task-specific Feature Interactions Network, and its baselines.

Quick start::

    from dtn.data import load_census, make_synthetic
    from dtn.config import load_config
    from dtn.models import build_model
    from dtn.train import Trainer

See README.md for a worked example.
"""
__version__ = "0.1.0"
