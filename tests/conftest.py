import os
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import settings

# Hypothesis runs derandomized by default (the "ci" profile: the same examples every run, so a CI
# failure is reproducible and never random); HYPOTHESIS_PROFILE=explore searches new examples
# locally. A case found that way is kept as an explicit @example on its test.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
CENSUS_DIR = os.environ.get("DTN_CENSUS_DIR") or os.path.join(SHARED, "data", "census-income")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # under pytest-xdist (`-n 2`) the workers share the cores: one intra-op thread each (and in
        # the processes they start) instead of every worker spinning up a thread per core. Tests that
        # are about thread counts set their own.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# a fixture decorator (arguments up to its `def`) that caches for a whole module, package or class
_MODULE_FIXTURE = re.compile(r"@pytest\.fixture\((?:(?!\bdef\b)[^@])*?scope=[\"'](module|package|class)[\"']")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: only called under `-n N`
def pytest_xdist_make_scheduler(config, log):
    """`pytest -n 2`: every test goes to whichever worker is free, except that the tests of a file
    that defines a module-scoped fixture (a trained checkpoint, a torchrun run, a built wheel) go
    to one worker together, so that the fixture is built once, not once per worker. Those files
    are handed out first (most tests first), the single tests after them.

    (xdist's own `--dist loadgroup` cannot be used for this: it tags a test's node id through an
    attribute that pytest 9 no longer reads, so its groups are silently ignored.)"""
    if config.getvalue("dist") != "load":
        return None  # an explicit --dist loadscope / loadfile / each: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath
    grouped = {}

    class FixtureScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            if path not in grouped:
                try:
                    grouped[path] = bool(_MODULE_FIXTURE.search((root / path).read_text()))
                except OSError:
                    grouped[path] = False
            return path if grouped[path] else nodeid

    return FixtureScopeScheduling(config, log)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_schema():
    from dtn.features import FeatureSpec, Schema

    return Schema([FeatureSpec("a", cardinality=5), FeatureSpec("b", cardinality=7), FeatureSpec("c", cardinality=3),
                   FeatureSpec("m", kind="multi", cardinality=9), FeatureSpec("x", kind="numeric"),
                   FeatureSpec("y", kind="numeric")], labels=["t1", "t2"])


@pytest.fixture
def tiny_batch():
    from dtn.features import FeatureBatch, JaggedField

    B = 8
    g = torch.Generator().manual_seed(1)
    cat = torch.stack([torch.randint(0, c, (B,), generator=g) for c in (5, 7, 3)], 1)
    lens = torch.tensor([2, 0, 3, 1, 1, 2, 0, 1])
    offsets = torch.zeros(B + 1, dtype=torch.long)
    offsets[1:] = lens.cumsum(0)
    multi = JaggedField(torch.randint(0, 9, (int(lens.sum()),), generator=g), offsets)
    labels = torch.randint(0, 2, (B, 2), generator=g).float()
    return FeatureBatch(cat, torch.randn(B, 2, generator=g), (multi,)), labels


# the tests' small model: the packaged "cpu" model config shrunk to seconds a training run
SMALL_MODEL = {"embed_dim": 4, "fim_dim": 16, "tower_hidden": [16], "expert_hidden": [32], "bottom_hidden": [32],
               "masknet": {"mask_hidden": 16, "block_dim": 16},
               "memonet": {"fields": None, "num_buckets": 997, "codebook_dim": 4}}


def small_model_config(**changes):
    """The packaged "cpu" ModelConfig with :data:`SMALL_MODEL`'s sizes and then ``changes`` (any
    ModelConfig field; ``masknet`` / ``memonet`` are merged into the small options, not replaced).
    Test modules import it (``from conftest import small_model_config``); one place to shrink a model."""
    import dataclasses

    from dtn.config import load_config

    base = load_config("cpu").model
    fields = {**SMALL_MODEL, **changes}
    for opt in ("masknet", "memonet"):
        fields[opt] = {**getattr(base, opt), **SMALL_MODEL[opt], **changes.get(opt, {})}
    return dataclasses.replace(base, **fields)


@pytest.fixture
def small_model_cfg():
    return small_model_config(tower_hidden=[8], expert_hidden=[16], bottom_hidden=[16], memonet={"num_buckets": 101})


@pytest.fixture(scope="session")
def census_dir():
    if not os.path.exists(os.path.join(CENSUS_DIR, "census-income.data.xz")) and \
            not os.path.exists(os.path.join(CENSUS_DIR, "census-income.data")):
        pytest.skip(f"Census-Income files not found in {CENSUS_DIR} (set DTN_CENSUS_DIR)")
    return CENSUS_DIR
