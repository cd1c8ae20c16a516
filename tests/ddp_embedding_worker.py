"""Run by tests/test_ddp_embedding.py (under torchrun, or alone for one process): trains MMoE on
synthetic data with each fused embedding optimizer and saves this rank's embedding table and
optimizer state to ``<out>/<optimizer>-rank<r>-of<world>.pt``."""
import dataclasses
import sys
import warnings

import torch

from dtn import distributed as D
from dtn.config import Config, DataConfig, TrainConfig, load_config
from dtn.data import make_synthetic
from dtn.train import train_model

OPTIMIZERS = ("sgd", "rowwise_adagrad", "lazy_adam")
ROWS = 1600  # 1280 training rows: 5 steps of 256


def config(opt: str) -> Config:
    cfg = load_config("cpu")
    model = dataclasses.replace(cfg.model, embed_dim=4, tower_hidden=[16], expert_hidden=[32], num_experts=2)
    train = TrainConfig(lr=5e-3, batch_size=256, eval_batch_size=4096, epochs=1, patience=10, progress=False, seed=11,
                        num_threads=1, embedding_optimizer=opt)
    return Config(model=model, train=train, data=DataConfig(dataset="synthetic"))


def main(out: str) -> None:
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    D.init_from_env("cpu")
    rank, world = D.rank_and_world()
    data = make_synthetic(ROWS, seed=3)
    for opt in OPTIMIZERS:
        trainer, _ = train_model("mmoe", data, config(opt), log=lambda *_: None)
        layer = trainer.model.input_layer
        so = layer.sparse_optimizer
        torch.save({"weight": layer.weight.detach().clone(), "state1": so.state1.clone(), "state2": so.state2.clone(),
                    "step": so.step, "dense": [p.detach().clone() for p in trainer.optimizer.param_groups[0]["params"]]},
                   f"{out}/{opt}-rank{rank}-of{world}.pt")
    D.cleanup(drain=True)  # every rank got here


if __name__ == "__main__":
    main(sys.argv[1])
