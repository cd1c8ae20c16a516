from .checkpoint import atomic_save, load_checkpoint
from .metrics import auc, log_loss, mean_auc, rela_imp, task_metrics
from .model_file import checkpoint_payload, model_from_checkpoint
from .run import train_model, write_metrics
from .trainer import Trainer, TrainingDivergedError, seed_everything

__all__ = ["atomic_save", "load_checkpoint", "auc", "log_loss", "mean_auc", "rela_imp", "task_metrics", "Trainer",
           "TrainingDivergedError", "checkpoint_payload", "model_from_checkpoint", "seed_everything", "train_model",
           "write_metrics"]
