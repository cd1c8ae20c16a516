"""`dtn export`: one folder (torch.export program + encoders + predictor) that predicts from raw
rows without the dtn code, exactly as the in-process model does."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import dtn_kernels
from dtn.cli import main
from dtn.data.examples import make_ali_ccp_frame
from dtn.serving import InputError, Predictor
from dtn.serving.export import FlatModel, non_aten_ops, random_inputs
from dtn.train import model_from_checkpoint
from owndata import SMALL_CLI

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A DTN trained on an Ali-CCP-layout file (weighted multi-valued features), exported."""
    d = tmp_path_factory.mktemp("export")
    df = make_ali_ccp_frame(2000, seed=11)
    df.to_csv(d / "train.csv", index=False)
    df.head(300).to_csv(d / "rows.csv", index=False)  # raw rows to predict, labels and all (ignored)
    assert main(["train", "--data-schema", "ali_ccp", "--data", str(d / "train.csv"), "--model", "dtn", "--epochs", "2",
                 "--out", str(d / "run"), *SMALL_CLI]) == 0
    assert main(["export", "--checkpoint", str(d / "run" / "best.pt"), "--out", str(d / "art")]) == 0
    return d


def _raw_rows(path):
    """Raw rows as the table reader reads a CSV: every cell as its text."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@torch.no_grad()
def _in_process(checkpoint, raw: pd.DataFrame, model=None) -> np.ndarray:
    m, enc, _ = model_from_checkpoint(str(checkpoint))
    m = model if model is not None else m
    m.eval()
    batch, _ = enc.transform(raw).batch(slice(None))
    return torch.sigmoid(m(batch)).numpy()


def test_artifact_contents(run):
    art = run / "art"
    assert sorted(os.listdir(art)) == ["dtn_codec.py", "encoders.json", "meta.json", "model.pt2", "predict.py"]
    meta = json.load(open(art / "meta.json"))
    assert meta["tasks"] == ["ctr", "cvr"] and meta["model"] == "dtn" and meta["check_max_abs_diff"] < 1e-6
    assert meta["inputs"][:5] == ["categorical", "numeric", "109_14.values", "109_14.offsets", "109_14.weights"]


def test_exported_predictor_without_dtn_matches_in_process_model(run):
    """predict.py in a fresh interpreter that cannot import dtn or dtn_kernels (-I -S: no site, no
    editable install, no cwd on sys.path; only the site-packages folders of torch and numpy)."""
    site = sorted({os.path.dirname(os.path.dirname(torch.__file__)), os.path.dirname(os.path.dirname(np.__file__))})
    code = (
        "import importlib.util, runpy, sys\n"
        f"sys.path[:0] = {site!r}\n"
        "assert importlib.util.find_spec('dtn') is None and importlib.util.find_spec('dtn_kernels') is None\n"
        f"sys.argv = ['predict.py', {str(run / 'rows.csv')!r}, '--out', 'pred.csv']\n"
        "try:\n"
        "    runpy.run_path('predict.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('dtn', 'dtn_kernels', 'pandas')], 'imported dtn'\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=run / "art", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = pd.read_csv(run / "art" / "pred.csv")
    assert list(got.columns) == ["ctr", "cvr"] and len(got) == 300
    want = _in_process(run / "run" / "best.pt", _raw_rows(run / "rows.csv"))
    np.testing.assert_allclose(got.to_numpy(), want, rtol=0, atol=1e-6)
    assert want.std(0).min() > 1e-3  # real, row-dependent predictions


def test_predictor_encodes_like_the_training_encoder(run):
    raw = _raw_rows(run / "rows.csv")
    p = Predictor(str(run / "art"))
    _, enc, _ = model_from_checkpoint(str(run / "run" / "best.pt"))
    want = enc.transform(raw)
    got = p.encode(raw)
    assert torch.equal(got[0], want.categorical) and torch.equal(got[1], want.numeric)
    for j, f in enumerate(enc.schema.multi):
        values, offsets, weights = got[2 + 3 * j: 5 + 3 * j]
        assert torch.equal(values, want.multi[j].values) and torch.equal(offsets, want.multi[j].offsets)
        assert torch.equal(weights, want.multi[j].weights)


def test_row_formats_batch_sizes_and_unseen_values(run):
    p = Predictor(str(run / "art"))
    raw = _raw_rows(run / "rows.csv")
    want = _in_process(run / "run" / "best.pt", raw)
    typed = make_ali_ccp_frame(2000, seed=11).head(300)  # ints and floats instead of text: the same values
    np.testing.assert_allclose(p.predict(typed), want, atol=1e-6)
    np.testing.assert_allclose(p.predict(raw.head(7).to_dict("records")), want[:7], atol=1e-6)
    np.testing.assert_allclose(p.predict(raw.head(1)), want[:1], atol=1e-6)  # padded to the exported minimum batch
    np.testing.assert_allclose(p.predict(raw, batch_size=64), want, atol=1e-6)
    assert p.predict(raw.head(0)).shape == (0, 2)
    odd = raw.head(3).copy()
    odd["101"] = "never-seen"  # out of vocabulary: id 0, no error
    odd["109_14"] = ["", "99999:1.5", "|"]  # empty bags and an unknown id
    assert np.isfinite(p.predict(odd)).all()


def test_predictor_errors_name_row_column_value(run):
    p = Predictor(str(run / "art"))
    raw = _raw_rows(run / "rows.csv").head(5)
    with pytest.raises(InputError, match=r"missing column\(s\) \['D508'\]"):
        p.predict(raw.drop(columns=["D508"]))
    bad = raw.copy()
    bad.loc[3, "D509"] = "n/a"
    with pytest.raises(InputError, match=r"row 3, column 'D509': value 'n/a' is not a finite number"):
        p.predict(bad)
    bad = raw.copy()
    bad.loc[2, "110_14"] = "5:x"
    with pytest.raises(InputError, match=r"row 2, column '110_14': token '5:x'"):
        p.predict(bad)


def test_exported_graph_has_only_aten_ops(run):
    m, _, _ = model_from_checkpoint(str(run / "run" / "best.pt"))
    program = torch.export.load(str(run / "art" / "model.pt2"))
    assert non_aten_ops(program) == []
    if dtn_kernels.HAS_C_EXT:  # the model as trained calls the compiled torch.ops.dtn.embedding_bag ...
        raw = torch.export.export(FlatModel(m.eval()), random_inputs(m.schema, 4))
        assert any(op.startswith("dtn.") for op in non_aten_ops(raw))  # ... which export must (and does) avoid


def test_trimmed_export(run, tmp_path):
    m, enc, cfg = model_from_checkpoint(str(run / "run" / "best.pt"))
    from dtn.data import load_dataset

    data = load_dataset(cfg.data, encoder=enc, progress=False)
    m.eval()
    weights = m.mean_gate_weights(b for b, _ in data.valid.batches(4096))
    threshold = float(max(w.min() for w in weights)) + 1e-6  # switches off at least one candidate
    untrimmed = _in_process(run / "run" / "best.pt", _raw_rows(run / "rows.csv"))
    m.trim(weights, threshold)
    assert main(["export", "--checkpoint", str(run / "run" / "best.pt"), "--out", str(tmp_path / "art"),
                 "--trim-threshold", str(threshold)]) == 0
    meta = json.load(open(tmp_path / "art" / "meta.json"))
    assert meta["trim"]["threshold"] == threshold and meta["params"] == meta["trim"]["params_after"]
    raw = _raw_rows(run / "rows.csv")
    got = Predictor(str(tmp_path / "art")).predict(raw)
    want = _in_process(run / "run" / "best.pt", raw, model=m)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(want - untrimmed).max() > 1e-4  # the trim changed the model that was exported
