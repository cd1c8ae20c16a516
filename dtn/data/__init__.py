from .census import CensusData, census_schema, find_census_files, load_census, read_census_file
from .encoders import DataError, EncodedData, SplitData, TabularEncoder
from .synthetic import PLANTED, SyntheticData, make_synthetic, make_synthetic_frame, synthetic_schema


def load_dataset(cfg, encoder=None):
    """The data set a :class:`dtn.config.DataConfig` names (``encoder``: reuse fitted encoders)."""
    if cfg.dataset == "census":
        return load_census(cfg.path, cfg.split_seed, bucketize=cfg.bucketize, numeric_ids=cfg.numeric_ids,
                           encoder=encoder)
    if cfg.dataset == "synthetic":
        return make_synthetic(cfg.synthetic_rows, cfg.split_seed, encoder=encoder)
    raise ValueError(f"unknown dataset {cfg.dataset!r}; known: census, synthetic")


__all__ = ["CensusData", "census_schema", "find_census_files", "load_census", "read_census_file", "DataError",
           "EncodedData", "SplitData", "TabularEncoder", "PLANTED", "SyntheticData", "make_synthetic", "make_synthetic_frame",
           "synthetic_schema", "load_dataset"]
