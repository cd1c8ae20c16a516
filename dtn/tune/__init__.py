"""``dtn tune``: hyperparameter search with Optuna, one study per model on the same trial budget.

* Search spaces are declared in YAML per model family (``dtn/configs/tune/cpu.yaml``; see
  :func:`load_search_space`); every value a space can produce is checked against the typed config
  before any data is read, and a bad entry is a :class:`SearchSpaceError` naming the key.
* Each trial trains one configuration (the base config with the sampled values) on a fixed random
  subsample of the train split for at most ``max_epochs`` epochs, and is scored by its best mean
  validation AUC (the trainer's own model-selection score). The test split is taken away before
  tuning starts: nothing here can read it.
* TPE samples the trials; a median pruner stops a trial whose validation AUC after an epoch is
  below the median of the finished trials at that epoch (the trainer's per-epoch hook).
* Trial 0 is the base configuration itself (where its values lie in the space).
* Each study lives in ``<out>/<model>/study.db`` (SQLite): an interrupted search resumes where it
  stopped (a trial cut off mid-way is marked failed and run again with the same values); a study
  made with another space, base config, data, subsample, epoch cap or seed is refused.
* The best trial's configuration is written as ``<out>/<model>/best.yaml``, a full config that
  ``dtn train --config`` and ``dtn table3 --config`` / ``--tuned <out>`` take.

One module a job: :mod:`.space` (search spaces and applying a trial's values), :mod:`.study` (one
study: trials, resume, summary, best.yaml), :mod:`.jobs` (several studies, worker processes, the
progress bar), :mod:`.report` (tune.md and finding the tuned configs).
"""
from .jobs import tune
from .report import load_tuned, tune_markdown
from .space import (KINDS, NOT_TUNABLE, SPACE_DIR, STUDY_DEFAULTS, Param, SearchSpace, SearchSpaceError, apply_params,
                    config_value, default_params, load_search_space)
from .study import (StaleStudyError, StudySettings, best_config, counts, require_optuna, run_study, study_key,
                    subsample_rows, summarize_study, without_test, write_best)

__all__ = ["KINDS", "NOT_TUNABLE", "SPACE_DIR", "STUDY_DEFAULTS", "Param", "SearchSpace", "SearchSpaceError",
           "StaleStudyError", "StudySettings", "apply_params", "best_config", "config_value", "counts", "default_params",
           "load_search_space", "load_tuned", "require_optuna", "run_study", "study_key", "subsample_rows",
           "summarize_study", "tune", "tune_markdown", "without_test", "write_best"]
