"""Your own data: YAML data schemas, CSV / Parquet ingestion, splits, and the errors bad files raise."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from dtn.cli import main
from dtn.data import DataError, SchemaError, TabularEncoder, load_table, load_table_schema
from dtn.data import codec
from dtn.data.examples import ALI_CCP_DENSE, ALI_CCP_MULTI, ALI_CCP_SPARSE, make_ali_ccp_frame, make_aliexpress_frame
from dtn.data.tabular import expand_columns, table_schema_from_dict
from owndata import SMALL_CLI, write_example

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("own")
    return {"ae_csv": write_example(d, "aliexpress", 3000, "csv"),
            "ccp_pq": write_example(d, "ali_ccp", 3000, "parquet", row_group_rows=700),
            "dir": str(d)}


# ---- end to end from the packaged schemas -------------------------------------------------------
def test_aliexpress_layout_trains_end_to_end(files, tmp_path):
    out = tmp_path / "ae"
    assert main(["train", "--data-schema", "aliexpress", "--data", files["ae_csv"], "--model", "dtn", "--out", str(out),
                 "--epochs", "3", *SMALL_CLI]) == 0
    m = json.load(open(out / "metrics.json"))
    assert set(m["valid"]) == {"click", "conversion"}  # the tasks, in the schema's (Task-Sensitive) order
    # the generator plants click and conversion signal: a trained model is far above AUC 0.5 on both
    assert m["valid"]["click"]["auc"] > 0.72 and m["valid"]["conversion"]["auc"] > 0.62, m["valid"]
    assert m["test"]["click"]["auc"] > 0.72, m["test"]
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--split", "valid", "--out",
                 str(tmp_path / "e.json")]) == 0
    again = json.load(open(tmp_path / "e.json"))["metrics"]
    assert again["click"]["auc"] == pytest.approx(m["valid"]["click"]["auc"], abs=1e-9)


def test_ali_ccp_layout_trains_end_to_end(files, tmp_path):
    out = tmp_path / "ccp"
    assert main(["train", "--data-schema", "ali_ccp", "--data", files["ccp_pq"], "--model", "dtn", "--out", str(out),
                 "--epochs", "3", *SMALL_CLI]) == 0
    m = json.load(open(out / "metrics.json"))
    assert list(m["valid"]) == ["ctr", "cvr"]  # task names from {name, column} labels, in order
    assert m["valid"]["ctr"]["auc"] > 0.7 and m["valid"]["cvr"]["auc"] > 0.6, m["valid"]


def test_schema_layouts_and_weighted_bags(files):
    ts = load_table_schema("ali_ccp", train=files["ccp_pq"])
    assert ts.label_columns == ["click", "purchase"] and ts.labels == ["ctr", "cvr"]
    kinds = {f.name: f.kind for f in ts.features}
    assert [n for n, k in kinds.items() if k == "categorical"] == ALI_CCP_SPARSE
    assert [n for n, k in kinds.items() if k == "multi"] == ALI_CCP_MULTI
    assert [n for n, k in kinds.items() if k == "numeric"] == ALI_CCP_DENSE
    data = load_table(ts, progress=False)
    raw = data.frames["train"]
    bag = data.train.multi[0]
    # row 0's "id:weight" cell: the weights are the parsed numbers, the ids their vocabulary ids
    cells = [t for t in raw["109_14"].iloc[0].split("|") if t]
    n0 = int(bag.offsets[1])
    assert n0 == len(cells)
    assert bag.weights[:n0].tolist() == pytest.approx([float(t.split(":")[1]) for t in cells])
    vocab = data.encoder.vocab["109_14"]
    assert bag.values[:n0].tolist() == [vocab.get(t.split(":")[0], 0) for t in cells]
    ae = load_table_schema("aliexpress", train=files["ae_csv"])
    assert [f.name for f in ae.features] == [f"categorical_{i}" for i in range(1, 17)] + \
        [f"numerical_{i}" for i in range(1, 64)]
    assert "search_id" not in [f.name for f in ae.features] and ae.split_key == "search_id"


# ---- splits ------------------------------------------------------------------------------------
def test_split_by_key_keeps_groups_and_is_seeded(files):
    ts = load_table_schema("aliexpress", train=files["ae_csv"])
    data = load_table(ts, progress=False)
    sets = {s: set(data.frames[s]["search_id"]) for s in ("train", "valid", "test")}
    assert not sets["train"] & sets["valid"] and not sets["train"] & sets["test"] and not sets["valid"] & sets["test"]
    n = sum(len(data.frames[s]) for s in sets)
    assert n == 3000 and 0.05 < len(data.frames["valid"]) / n < 0.16 and 0.05 < len(data.frames["test"]) / n < 0.16
    ts.split_seed = 99
    other = load_table(ts, progress=False)
    assert set(other.frames["valid"]["search_id"]) != sets["valid"]


def test_csv_and_parquet_copies_split_and_encode_alike(tmp_path):
    df = make_ali_ccp_frame(1500, seed=4)
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet", row_group_size=400)
    a = load_table(load_table_schema("ali_ccp", train=str(tmp_path / "t.csv")), progress=False)
    b = load_table(load_table_schema("ali_ccp", train=str(tmp_path / "t.parquet")), progress=False)
    assert a.encoder == b.encoder  # ints read from Parquet and the same digits read from CSV are one value
    for s in ("train", "valid", "test"):
        assert torch.equal(getattr(a, s).categorical, getattr(b, s).categorical)
        assert torch.equal(getattr(a, s).multi[1].values, getattr(b, s).multi[1].values)


def test_separate_test_file(files, tmp_path):
    test_path = tmp_path / "test.csv"
    make_aliexpress_frame(400, seed=9).to_csv(test_path, index=False)
    data = load_table(load_table_schema("aliexpress", train=files["ae_csv"], test=str(test_path)), progress=False)
    assert len(data.test) == 400 and len(data.train) + len(data.valid) == 3000


# ---- the schema file ---------------------------------------------------------------------------
def test_column_patterns():
    assert expand_columns("c_{1..3}") == ["c_1", "c_2", "c_3"]
    assert expand_columns("D{109,110}_14") == ["D109_14", "D110_14"]
    assert expand_columns(["a", "x{01..03}"]) == ["a", "x01", "x02", "x03"]
    assert expand_columns("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]


@pytest.mark.parametrize("raw, match", [
    ({"labels": ["y1", "y2"], "features": [{"columns": "f{1..2}", "kind": "categorical", "min_cnt": 2}]},
     r"features\[0\]: unknown key\(s\) \['min_cnt'\]"),
    ({"labels": ["y1", "y2"], "features": [{"name": "a"}, {"name": "b", "kind": "dense"}]},
     r"features\[1\] \(b\): feature 'b': kind must be one of"),
    ({"features": [{"name": "a"}]}, r"labels: a list of label columns"),
    ({"labels": ["y1", "y2"], "features": [{"name": "a"}], "split": {"valid": 1.5}}, r"split.valid: a fraction"),
    ({"labels": ["y1", "y2"], "features": [{"name": "a"}], "chunk_rows": 0}, r"chunk_rows: a positive integer"),
    ({"labels": ["y1", "y2"], "features": [{"name": "y1"}]}, r"\['y1'\] are label columns"),
    ({"labels": ["y1", "y2"], "features": [{"name": "a"}], "colums": 1}, r"unknown key\(s\) \['colums'\]"),
    ({"labels": ["y1", "y2"], "features": [{"name": "t", "kind": "categorical", "weight_separator": ":"}]},
     r"weight_separator applies to multi features only"),
])
def test_schema_errors_name_the_key(raw, match):
    with pytest.raises(SchemaError, match=match):
        table_schema_from_dict(raw, "my.yaml")


def test_schema_file_paths_are_relative_to_it(tmp_path, files):
    sub = tmp_path / "cfg"
    sub.mkdir()
    os.symlink(files["ae_csv"], tmp_path / "data.csv")
    (sub / "s.yaml").write_text("labels: [click, conversion]\ntrain: ../data.csv\n"
                                "features:\n  - {columns: 'categorical_{1..3}', kind: categorical}\n")
    ts = load_table_schema(str(sub / "s.yaml"))
    assert os.path.samefile(ts.train[0], files["ae_csv"]) and len(ts.features) == 3
    with pytest.raises(SchemaError, match="no train file"):
        (sub / "t.yaml").write_text("labels: [click, conversion]\nfeatures: [{name: categorical_1}]\n")
        load_table_schema(str(sub / "t.yaml"))


# ---- malformed rows and schema mismatches ---------------------------------------------------------
def _csv(tmp_path, lines, name="bad.csv"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _tiny(tmp_path, train, **extra):
    import yaml

    raw = {"labels": ["click", "buy"], "train": train, "split": {"valid": 0.0, "test": 0.0},
           "features": [{"name": "c", "kind": "categorical"}, {"name": "x", "kind": "numeric"},
                        {"name": "tags", "kind": "multi", "weight_separator": ":"}], **extra}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    return load_table_schema(str(tmp_path / "s.yaml"))


GOOD = ["c,x,tags,click,buy", "a,1.5,t1:0.5|t2,1,0", "b,2,,0,0", "a,-1,t2:2,1,1"]


def test_good_tiny_file(tmp_path):
    data = load_table(_tiny(tmp_path, _csv(tmp_path, GOOD)), progress=False)
    assert len(data.train) == 3 and data.train.multi[0].offsets.tolist() == [0, 2, 2, 3]
    assert data.train.multi[0].weights.tolist() == [0.5, 1.0, 2.0]  # an id without a weight weighs 1


def test_crlf_blank_lines_no_header_and_no_final_newline(tmp_path):
    p = tmp_path / "win.csv"
    p.write_bytes(b"a,1.5,t1:0.5|t2,1,0\r\n\r\nb,2,,0,0\r\na,-1,t2:2,1,1")
    ts = _tiny(tmp_path, str(p), csv={"header": False, "columns": ["c", "x", "tags", "click", "buy"]}, chunk_rows=2)
    data = load_table(ts, progress=False)
    assert len(data.train) == 3 and data.frames["train"].index.tolist() == [1, 3, 4]  # file lines
    assert data.train.labels.tolist() == [[1, 0], [0, 0], [1, 1]]
    assert sorted(data.encoder.vocab["c"]) == ["a", "b"]  # no stray "\r" in the last column's values
    import gzip

    (tmp_path / "z.csv").write_bytes(gzip.compress(b"c,x,tags,click,buy\n"))
    with pytest.raises(DataError, match="gzip-compressed"):
        load_table(_tiny(tmp_path, str(tmp_path / "z.csv")), progress=False)


@pytest.mark.parametrize("edit, match", [
    (lambda ls: ls[:2] + ["b,2,,0,0,surplus"] + ls[3:],
     r"bad.csv: line 3: 6 fields, expected 5: field 6 'surplus' has no column"),
    (lambda ls: ls[:3] + ["a,-1,t2:2,1"],
     r"bad.csv: line 4: 4 fields, expected 5: column 'buy' \(field 5\) and after are missing"),
    (lambda ls: ls[:2] + ["b,two,,0,0"] + ls[3:],
     r"bad.csv: column 'x', line 3: value 'two' is not a number \(feature 'x' is numeric\)"),
    (lambda ls: ls[:2] + ["b,,,0,0"] + ls[3:], r"bad.csv: column 'x', line 3: value '' is not a number"),
    (lambda ls: ls[:3] + ["a,-1,t2:2,1,2"], r"bad.csv: column 'buy', line 4: label value '2' is not 0 or 1"),
    (lambda ls: ls[:3] + ["a,-1,t2:heavy,1,1"],
     r"bad.csv: column 'tags', line 4: token 't2:heavy' of feature 'tags' has a weight that is not a finite number"),
    (lambda ls: ["c,x,tag,click,buy"] + ls[1:], r"bad.csv: missing column\(s\) \['tags'\] named in the data schema"),
])
def test_malformed_csv_errors_name_line_column_value(tmp_path, edit, match):
    ts = _tiny(tmp_path, _csv(tmp_path, edit(list(GOOD))))
    with pytest.raises(DataError, match=match):
        load_table(ts, progress=False)


def test_error_in_a_later_chunk_names_its_file_line(tmp_path):
    lines = list(GOOD) + [f"a,{i},t1,0,1" for i in range(40)]
    lines[30] = "a,oops,t1,0,1"
    ts = _tiny(tmp_path, _csv(tmp_path, lines), chunk_rows=7)
    with pytest.raises(DataError, match=r"column 'x', line 31: value 'oops'"):
        load_table(ts, progress=False)


def test_parquet_errors_name_row_and_column(tmp_path):
    df = pd.DataFrame({"c": ["a", "b", "a"], "x": [1.0, 2.0, 3.0], "tags": ["t1", "", "t2"], "click": [1, 0, 1],
                       "buy": [0, 0, 3]})
    df.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: column 'buy', row 2: label value 3 is not 0 or 1"):
        load_table(_tiny(tmp_path, str(tmp_path / "bad.parquet")), progress=False)
    df.drop(columns=["x"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: missing column\(s\) \['x'\]"):
        load_table(_tiny(tmp_path, str(tmp_path / "bad.parquet")), progress=False)
    df.assign(x=[1.0, np.nan, 3.0], buy=0).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"column 'x', row 1: value nan \(NaN/inf\)"):
        load_table(_tiny(tmp_path, str(tmp_path / "bad.parquet")), progress=False)


def test_weight_column(tmp_path):
    lines = ["c,x,tags,w,click,buy", "a,1,t1|t2,0.5|2,1,0", "b,2,t2,3,0,1"]
    feats = [{"name": "c"}, {"name": "x", "kind": "numeric"}, {"name": "tags", "kind": "multi", "weight_column": "w"}]
    data = load_table(_tiny(tmp_path, _csv(tmp_path, lines), features=feats), progress=False)
    assert data.train.multi[0].weights.tolist() == [0.5, 2.0, 3.0]
    lines[2] = "b,2,t2,3|4,0,1"
    ts = _tiny(tmp_path, _csv(tmp_path, lines), features=feats)
    with pytest.raises(DataError, match=r"column 'w', line 3: 2 weights '3\|4' for 1 ids 't2' of feature 'tags'"):
        load_table(ts, progress=False)
    lines[2] = "b,2,t2,1e39,0,1"
    ts = _tiny(tmp_path, _csv(tmp_path, lines), features=feats)
    with pytest.raises(DataError, match=r"column 'w', line 3: weight '1e39' of feature 'tags' is not a finite number "
                                        r"within the float32 range"):
        load_table(ts, progress=False)


def test_split_weight_column_names_the_row():
    """The one weight-column check of training (encoders) and serving (the exported predictor)."""
    cells = np.array(["0.5|2", "", "3"], dtype=object)
    w, problem = codec.split_weight_column(cells, "|", np.array([2, 0, 1]))
    assert problem is None and w.tolist() == [0.5, 2.0, 3.0]
    assert codec.split_weight_column(cells, "|", np.array([2, 1, 1]))[1] == ("count", 1, 0)
    bad = np.array(["1|2", "x"], dtype=object)
    assert codec.split_weight_column(bad, "|", np.array([2, 1]))[1] == ("value", 1, "x")


def test_cli_reports_data_errors(tmp_path, capsys):
    ts_path = tmp_path / "s.yaml"
    _tiny(tmp_path, _csv(tmp_path, GOOD[:2] + ["b,two,,0,0"]), split={"valid": 0.4, "test": 0.0})
    # mmoe: DTN's MemoNet would need two categorical features, refused before the data are read
    assert main(["train", "--data-schema", str(ts_path), "--model", "mmoe", "--out", str(tmp_path / "r"), *SMALL_CLI]) == 2
    assert "data error: " in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "r")]) == 2
    assert "--data-schema" in capsys.readouterr().err


# ---- encoding rules ------------------------------------------------------------------------------
def test_canonical_strings_one_value_however_typed():
    assert codec.canonical_strings(np.array([3, 4])).tolist() == ["3", "4"]
    assert codec.canonical_strings(np.array([3.0, 0.25, np.nan])).tolist() == ["3", "0.25", ""]
    assert codec.canonical_strings(np.array(["3", None, 3, 3.0, True], dtype=object)).tolist() == \
        ["3", "", "3", "3", "True"]
    enc = TabularEncoder(_tiny_schema()).fit(pd.DataFrame({"c": [1, 2, 2], "t": [0, 1, 1]}))
    again = enc.transform(pd.DataFrame({"c": ["2", "1", "7"], "t": [0, 0, 0]}))
    assert again.categorical[:, 0].tolist() == [enc.vocab["c"]["2"], enc.vocab["c"]["1"], 0]


def _tiny_schema():
    from dtn.features import FeatureSpec, Schema

    return Schema([FeatureSpec("c")], labels=["t"])


def test_example_data_command(tmp_path, capsys):
    out = tmp_path / "ccp.parquet"
    assert main(["example-data", "--layout", "ali_ccp", "--rows", "500", "--out", str(out)]) == 0
    df = pd.read_parquet(out)
    assert list(df.columns[:2]) == ["click", "purchase"] and len(df) == 500
    assert (df.purchase <= df.click).all()  # conversions only on clicks, as in the real data
    assert "500 rows" in capsys.readouterr().out
