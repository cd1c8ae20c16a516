"""The embedding tables' optimizer in training (``train.embedding_optimizer``, ``train.embedding_lr``).

* ``rowwise_adagrad`` (the default), ``sgd``, ``lazy_adam``: a fused sparse optimizer owned by the
  input layer (:mod:`dtn.features.fused_embedding`) updates only the rows a batch touched, inside the
  backward; the dense Adam keeps every other parameter. The state (``input_layer.sparse_optimizer.*``)
  is part of the model's state_dict, so ``last.pt`` carries it (``best.pt``, a model file, does not).
  ``rowwise_adagrad`` is the default: on Census-Income (``cpu`` config, 3 seeds) it beats the dense
  Adam on DTN on every seed and is within noise on MMoE, with one float32 of state per row and a step
  that does not grow with the vocabulary (README, "Sparse embedding optimizers").
* ``adam``: the embedding weight is one more parameter of the dense Adam (a dense [R, d] gradient
  and Adam moments for every row, every step); with ``train.embedding_lr`` set it is a parameter
  group of its own with that lr. The paper's setup (``paper`` config), and the only one of
  unsharded TorchRec tables (:func:`dtn.train.sharded.check_embedding_optimizer`).

How it meets the trainer's options:

* **lr**: ``train.embedding_lr`` (default :data:`DEFAULT_EMBEDDING_LR`), times the LR schedule's
  factor of the step (``lr(step) / train.lr``: warm-up, cosine, plateau cuts apply to it alike).
* **weight decay**: ``train.weight_decay`` (L2, coupled, as the dense Adam's), on touched rows only.
* **gradient clipping** (``train.grad_clip``) clips the dense parameters' gradients only; the fused
  rows' gradients are not part of the norm and are not clipped (as FBGEMM's / TorchRec's fused
  optimizers).
* **bf16** needs nothing (float32 weights and state). **fp16**: the update is deferred until the
  GradScaler has decided: the rows' gradients are unscaled (``grad_scale = 1 / scale``), and a
  non-finite one marks the step as overflowed (it makes one dense gradient NaN, so the scaler skips
  the dense step and backs the scale off); a skipped step (the scale went down) applies no update.
  This reads the scale on the host twice a step (two syncs on a GPU).
* **DDP**: the embedding weight and the state are left out of DDP (no all-reduce of an [R, d]
  gradient). The update is deferred: every rank's touched rows and their gradients are gathered in
  rank order (:func:`dtn.distributed.gather_rows`) and every rank applies the same update to the same
  concatenation with ``grad_scale = 1 / world_size`` (DDP's average; the per-rank objective weighting
  is already in each rank's gradients), so the replicas stay identical bit for bit.
"""
from __future__ import annotations

import torch

from .. import distributed as D
from ..features.fused_embedding import SPARSE_OPTIMIZERS

# the lr of each embedding optimizer when train.embedding_lr is null; None: train.lr. Chosen on
# Census-Income's validation split (results/embedding-optimizers/README.md, the lr sweep).
DEFAULT_EMBEDDING_LR = {"adam": None, "lazy_adam": None, "sgd": 1.0, "rowwise_adagrad": 0.1}

EMBEDDING_GROUP = "embedding"  # the name of the dense Adam's embedding parameter group (adam + embedding_lr)


def embedding_lr(cfg) -> float:
    """The embedding lr before the schedule: ``train.embedding_lr``, or the optimizer's default."""
    if cfg.embedding_lr is not None:
        return float(cfg.embedding_lr)
    default = DEFAULT_EMBEDDING_LR[cfg.embedding_optimizer]
    return float(cfg.lr if default is None else default)


class EmbeddingOptim:
    """The trainer's side of the embedding optimizer: the dense parameter groups, the fused
    optimizer's lr every step, and the deferred update (DDP, fp16)."""

    def __init__(self, model, cfg, world_size: int = 1, device="cpu", fp16: bool = False, sharded: bool = False):
        self.cfg = cfg
        self.world_size = world_size
        self.device = torch.device(device)
        self.lr = embedding_lr(cfg)
        # a layer whose tables another optimizer updates (TorchRec's: FBGEMM's fused one when sharded, and
        # train_model refuses the rest) or sharded tables: nothing to do here
        layer = None if sharded else getattr(model, "input_layer", None)
        self.layer = layer if getattr(layer, "own_sparse_optimizer", True) else None
        self.opt = None  # the SparseEmbeddingOptimizer when fused
        self._rows = None  # (rows, row_grads) gathered for this step's deferred update
        if cfg.embedding_optimizer in SPARSE_OPTIMIZERS and not sharded and self.layer is layer:
            if self.layer is None or not hasattr(self.layer, "use_sparse_optimizer"):
                raise ValueError(f"train.embedding_optimizer = {cfg.embedding_optimizer!r}: the model has no input layer "
                                 "with embedding tables")
            self.opt = self.layer.use_sparse_optimizer(cfg.embedding_optimizer, self.lr, cfg.weight_decay)
            self.opt.deferred = world_size > 1 or fp16

    @property
    def fused(self) -> bool:
        return self.opt is not None

    # ---- the dense optimizer ---------------------------------------------------------------------
    def param_groups(self, model) -> list[dict]:
        """The dense Adam's parameter groups: every parameter but a fused embedding weight; with
        ``adam`` and ``train.embedding_lr`` set, the embedding weight as a group of its own."""
        emb = getattr(self.layer, "weight", None) if self.layer is not None else None
        if emb is None or (not self.fused and self.cfg.embedding_lr is None):
            return [{"params": list(model.parameters())}]
        rest = [p for p in model.parameters() if p is not emb]
        if self.fused:
            return [{"params": rest}]
        return [{"params": rest}, {"params": [emb], "name": EMBEDDING_GROUP, "lr": self.lr,
                                   "lr_scale": self.lr / self.cfg.lr}]

    def reset_group_lrs(self, optimizer) -> None:
        """After loading an optimizer state: this run's lr (and the embedding group's) in every group."""
        self.lr = embedding_lr(self.cfg)
        for group in optimizer.param_groups:
            if group.get("name") == EMBEDDING_GROUP:
                group["lr"], group["lr_scale"] = self.lr, self.lr / self.cfg.lr
            else:
                group["lr"] = self.cfg.lr

    def ddp_ignored(self, model) -> list[str]:
        """Names DDP must leave alone: the fused weight and its optimizer state."""
        if not self.fused:
            return []
        names = [n for n, p in model.named_parameters() if p is self.layer.weight]
        names += [n for n, b in model.named_buffers() if b is self.opt.state1 or b is self.opt.state2]
        return names

    def broadcast_from_rank0(self) -> None:
        """Start every replica from rank 0's table and state (DDP does this for the parameters it owns)."""
        if not self.fused or not D.is_distributed():
            return
        for t in (self.layer.weight.data, self.opt.state1, self.opt.state2):
            if t.numel():
                dev = D.comm_device(t.device)
                buf = t.to(dev)
                torch.distributed.broadcast(buf, 0)
                t.copy_(buf)

    # ---- a step ----------------------------------------------------------------------------------
    def before_backward(self, schedule) -> None:
        """The lr of the fused update this step makes (in the backward, or deferred)."""
        if self.fused:
            self.opt.lr = self.lr * schedule.factor()

    def after_backward(self, optimizer, fp16: bool) -> None:
        """Deferred update: gather the rows' gradients over the ranks; with fp16, a non-finite one
        makes the step an overflow for the GradScaler (a dense gradient is multiplied by NaN)."""
        if not self.fused or not self.opt.deferred:
            return
        pending = self.opt.take_pending()
        weight = self.layer.weight
        if pending is None:
            pending = (torch.zeros(0, dtype=torch.long, device=weight.device),
                       torch.zeros(0, weight.shape[1], dtype=torch.float32, device=weight.device))
        rows, grads = pending
        if self.world_size > 1:
            rows, grads = D.gather_rows(rows, self.device), D.gather_rows(grads, self.device)
        self._rows = (rows, grads)
        if fp16:
            bad = ~torch.isfinite(grads).all()
            mark = torch.where(bad, torch.full((), float("nan"), device=grads.device),
                               torch.ones((), device=grads.device))
            for group in optimizer.param_groups:
                p = next((p for p in group["params"] if p.grad is not None), None)
                if p is not None:
                    p.grad.mul_(mark.to(p.grad.device, p.grad.dtype))
                    break

    def optimizer_step(self, optimizer, scaler) -> None:
        """The dense step, then the deferred embedding update (skipped with a step the scaler skipped)."""
        rows, self._rows = self._rows, None
        if scaler is None:
            optimizer.step()
            if rows is not None:
                self.opt.apply_rows(self.layer.weight.data, rows[0], rows[1], 1.0 / self.world_size)
            return
        if rows is None:
            scaler.step(optimizer)
            scaler.update()
            return
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() >= scale:  # a skipped step (inf / NaN) backs the scale off
            self.opt.apply_rows(self.layer.weight.data, rows[0], rows[1], 1.0 / (self.world_size * scale))
