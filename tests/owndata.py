"""Helpers for the own-data tests (test_ingest, test_stream, test_ddp, test_export): generated
AliExpress / Ali-CCP layout files and a small model configuration."""
import dataclasses
import os

from conftest import small_model_config
from dtn.config import Config, DataConfig, TrainConfig
from dtn.data.examples import make_example_frame, write_table

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# `dtn train` flags for a model small enough to train in seconds on one CPU thread
SMALL_CLI = ["--set", "model.embed_dim=4", "--set", "model.fim_dim=16", "--set", "model.tower_hidden=[16]",
             "--set", "model.bottom_hidden=[32]", "--set", "model.expert_hidden=[32]",
             "--set", "model.masknet={mask_hidden: 16, block_dim: 16}",
             "--set", "model.memonet={fields: 6, num_buckets: 997, codebook_dim: 4}",
             "--set", "train.batch_size=256", "--set", "train.progress=false", "--set", "train.lr=0.005",
             "--threads", "1"]


def small_config(epochs: int = 2, **train) -> Config:
    model = small_model_config(memonet={"fields": 6})
    t = TrainConfig(lr=5e-3, batch_size=256, eval_batch_size=4096, epochs=epochs, patience=5, progress=False, seed=7,
                    num_threads=1)
    return Config(model=model, train=dataclasses.replace(t, **train), data=DataConfig(dataset="table"))


def write_example(folder, layout: str, rows: int, ext: str = "csv", seed: int = 0, row_group_rows=None) -> str:
    path = os.path.join(str(folder), f"{layout}_{rows}_{seed}.{ext}")
    if not os.path.exists(path):
        write_table(make_example_frame(layout, rows, seed), path, row_group_rows)
    return path
