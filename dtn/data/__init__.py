from .census import CensusData, census_schema, find_census_files, load_census, read_census_file
from .encoders import DataError, EncodedData, SplitData, TabularEncoder
from .synthetic import PLANTED, SyntheticData, make_synthetic, make_synthetic_frame, synthetic_schema
from .tabular import SchemaError, TableSchema, load_table, load_table_schema


def load_dataset(cfg, encoder=None, progress: bool = True):
    """The data set a :class:`dtn.config.DataConfig` names (``encoder``: reuse fitted encoders)."""
    if cfg.dataset == "table":
        if not cfg.schema:
            raise ValueError("data.dataset is 'table': set data.schema to a data schema YAML (--data-schema)")
        ts = load_table_schema(cfg.schema, train=cfg.path, valid=cfg.valid_path, test=cfg.test_path,
                               chunk_rows=cfg.chunk_rows)
        if cfg.stream:
            from .stream import load_table_streaming

            return load_table_streaming(ts, encoder, num_workers=cfg.num_workers, progress=progress)
        return load_table(ts, encoder, progress=progress)
    if cfg.dataset == "census":
        return load_census(cfg.path, cfg.split_seed, bucketize=cfg.bucketize, numeric_ids=cfg.numeric_ids,
                           encoder=encoder)
    if cfg.dataset == "synthetic":
        return make_synthetic(cfg.synthetic_rows, cfg.split_seed, encoder=encoder)
    raise ValueError(f"unknown dataset {cfg.dataset!r}; known: census, synthetic, table")


__all__ = ["CensusData", "census_schema", "find_census_files", "load_census", "read_census_file", "DataError",
           "EncodedData", "SplitData", "TabularEncoder", "PLANTED", "SyntheticData", "make_synthetic", "make_synthetic_frame",
           "synthetic_schema", "load_dataset", "SchemaError", "TableSchema", "load_table", "load_table_schema"]
