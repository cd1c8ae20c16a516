"""Data loading: the Census-Income protocol, the synthetic generator, and bad input."""
import lzma

import numpy as np
import pandas as pd
import pytest
import torch

from dtn.data import (DataError, TabularEncoder, find_census_files, load_census, make_synthetic,
                      read_census_file)
from dtn.data.census import COLUMNS
from dtn.features import FeatureSpec, Schema


@pytest.fixture(scope="module")
def census(census_dir):
    return load_census(census_dir)


def test_census_protocol(census):
    assert (len(census.train), len(census.valid), len(census.test)) == (199_523, 49_881, 49_881)
    s = census.schema
    assert s.labels == ["income", "marital"]
    assert len(s.features) == 39 and len(s.numeric) == 7 and len(s.categorical) == 32
    names = {f.name for f in s.features}
    assert not names & {"income_50k", "marital_stat", "instance_weight"}
    pos = census.train.labels.mean(0)
    assert abs(float(pos[0]) - 0.062) < 0.001 and abs(float(pos[1]) - 0.433) < 0.002
    # the two labels are weakly negatively correlated (MMoE paper: |0.1768|)
    r = np.corrcoef(census.train.labels.numpy().T)[0, 1]
    assert -0.2 < r < -0.15
    # numeric inputs are standardised on train
    assert torch.allclose(census.train.numeric.mean(0), torch.zeros(7), atol=1e-4)


def test_census_split_is_fixed_and_disjoint(census_dir, census):
    again = load_census(census_dir)
    assert torch.equal(again.test.categorical, census.test.categorical)
    v, t = census.frames["valid"], census.frames["test"]
    assert len(pd.concat([v, t]).drop_duplicates()) > 0.99 * (len(v) + len(t))  # the halves are disjoint rows
    other = load_census(census_dir, split_seed=7)
    assert not torch.equal(other.test.categorical, census.test.categorical)


def test_encoders_fit_on_train_only(census):
    enc = census.encoder
    # every train value of a categorical feature has an id > 0; unseen values map to the OOV id 0
    assert int(census.train.categorical.min()) >= 1
    f = census.schema.categorical[0]
    df = census.frames["test"].head(3).copy()
    df[f.source] = "a value never seen"
    out = enc.transform(df)
    assert out.categorical[:, 0].tolist() == [0, 0, 0]


def test_find_files_from_env(census_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("DTN_CENSUS_DIR", census_dir)
    files = find_census_files()
    assert files["train"].startswith(census_dir)
    with pytest.raises(FileNotFoundError, match="lacks"):
        find_census_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_census_files(str(tmp_path / "nope"))


def test_no_files_and_no_download(monkeypatch, tmp_path):
    monkeypatch.delenv("DTN_CENSUS_DIR", raising=False)
    monkeypatch.setenv("DTN_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="DTN_CENSUS_DIR"):
        find_census_files(download=False)


def test_download_failure_message(monkeypatch, tmp_path):
    from dtn.data import census as census_mod

    monkeypatch.delenv("DTN_CENSUS_DIR", raising=False)
    monkeypatch.setenv("DTN_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="--data-dir"):
        census_mod.download_census(str(tmp_path), base_url="http://127.0.0.1:9/")


def test_download_checks_sha(monkeypatch, tmp_path):
    """A served file whose content differs from UCI's is refused."""
    import gzip
    import http.server
    import threading

    from dtn.data import census as census_mod

    served = tmp_path / "srv"
    served.mkdir()
    for name in ("census-income.data", "census-income.test"):
        (served / f"{name}.gz").write_bytes(gzip.compress(b"1, 2, 3\n"))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match="SHA-256 .* does not match"):
            census_mod.download_census(str(tmp_path / "cache"), base_url=f"http://127.0.0.1:{httpd.server_port}/")
    finally:
        httpd.shutdown()
    assert not (tmp_path / "cache" / "census-income.data").exists()


# ---- bad input ---------------------------------------------------------------------------------
def _row(**changes):
    vals = {c: "0" for c in COLUMNS}
    vals.update(income_50k="- 50000.", marital_stat="Never married")
    vals.update(changes)
    return ", ".join(vals[c] for c in COLUMNS)


def test_empty_file(tmp_path):
    p = tmp_path / "census-income.data"
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_census_file(str(p))


def test_malformed_row_names_the_line(tmp_path):
    p = tmp_path / "census-income.data.xz"
    lines = [_row() for _ in range(5)]
    lines[3] = lines[3] + ", extra"
    p.write_bytes(lzma.compress("\n".join(lines).encode()))
    with pytest.raises(DataError, match="malformed row at line 4: 43 fields, expected 42"):
        read_census_file(str(p))


def _frame():
    return pd.DataFrame({"a": ["x", "y", "x"], "n": [1.0, 2.0, 3.0], "t": [0, 1, 1]})


def _schema():
    return Schema([FeatureSpec("a"), FeatureSpec("n", kind="numeric")], labels=["t"])


def test_unknown_column():
    schema = Schema([FeatureSpec("a"), FeatureSpec("missing_col", kind="numeric")], labels=["t"])
    with pytest.raises(DataError, match=r"missing column\(s\) \['missing_col'\]"):
        TabularEncoder(schema).fit(_frame(), source="f.csv")


def test_wrong_dtype_names_column_row_value():
    df = _frame()
    df["n"] = ["1.5", "2", "abc"]
    with pytest.raises(DataError, match=r"column 'n', row 2: value 'abc' is not a number"):
        TabularEncoder(_schema()).fit(df, source="f.csv")
    df["n"] = [True, False, True]
    with pytest.raises(DataError, match="dtype bool"):
        TabularEncoder(_schema()).fit(df)


def test_nan_in_numeric_column():
    enc = TabularEncoder(_schema()).fit(_frame())
    df = _frame()
    df.loc[1, "n"] = np.nan
    with pytest.raises(DataError, match=r"f.csv: column 'n', row 1: value nan \(NaN/inf\)"):
        enc.transform(df, source="f.csv")


def test_bad_label_value():
    df = _frame()
    df.loc[2, "t"] = 3
    with pytest.raises(DataError, match=r"column 't', row 2: label value 3 is not 0 or 1"):
        TabularEncoder(_schema()).fit(df).transform(df)


def test_empty_frame():
    with pytest.raises(DataError, match="no rows"):
        TabularEncoder(_schema()).fit(_frame().iloc[:0])


def test_bucketized_and_multi_features():
    schema = Schema([FeatureSpec("n_b", column="n", bins=2), FeatureSpec("tags", kind="multi"),
                     FeatureSpec("n", kind="numeric", transform="minmax")], labels=["t"])
    df = _frame().assign(tags=["a|b", "", "b|c|a"])
    enc = TabularEncoder(schema).fit(df)
    out = enc.transform(df)
    assert out.categorical[:, 0].tolist() == [1, 2, 2]
    assert out.multi[0].offsets.tolist() == [0, 2, 2, 5]
    assert out.numeric[:, 0].tolist() == [0.0, 0.5, 1.0]
    # the encoder survives a round trip through its state dict
    again = TabularEncoder.from_state_dict(enc.state_dict()).transform(df)
    assert torch.equal(again.categorical, out.categorical) and torch.equal(again.multi[0].values, out.multi[0].values)


def test_jagged_batches_slice_correctly():
    data = make_synthetic(300, seed=1).train
    m = data.multi[0]
    idx = torch.tensor([5, 0, 17])
    batch, _ = data.batch(idx)
    j = batch.multi[0]
    for b, i in enumerate(idx.tolist()):
        assert j.values[j.offsets[b]:j.offsets[b + 1]].tolist() == m.values[m.offsets[i]:m.offsets[i + 1]].tolist()


def test_synthetic_planted_structure():
    d = make_synthetic(4000, seed=0)
    df = d.frames["train"]
    # t1_num drives task1 only; t2_num drives task2 only
    c = df[["t1_num", "t2_num", "task1", "task2"]].corr()
    assert c.loc["t1_num", "task1"] > 0.2 and abs(c.loc["t1_num", "task2"]) < 0.05
    assert c.loc["t2_num", "task2"] < -0.2 and abs(c.loc["t2_num", "task1"]) < 0.05
    assert d.schema.labels == ["task1", "task2"] and len(d.test) == 400
