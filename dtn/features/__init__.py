from .schema import FeatureSpec, Schema, FeatureBatch, JaggedField
from .embedding import InputLayer

__all__ = ["FeatureSpec", "Schema", "FeatureBatch", "JaggedField", "InputLayer"]
