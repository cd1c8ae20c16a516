"""benchmarks/count_launches.py: kernels per training / inference step in each kernel mode."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import count_launches as CL  # noqa: E402

import dtn_kernels  # noqa: E402
from conftest import small_model_config  # noqa: E402
from dtn.features import FeatureBatch, FeatureSpec, Schema  # noqa: E402
from dtn.models import build_model  # noqa: E402


def _small():
    cards = (5, 7, 3, 11)
    schema = Schema([FeatureSpec(f"c{i}", cardinality=c) for i, c in enumerate(cards)]
                    + [FeatureSpec("x", kind="numeric")], labels=["a", "b"])
    cfg = small_model_config(fim_dim=12, tower_hidden=[6], masknet={"mask_hidden": 10, "block_dim": 9},
                             memonet={"num_buckets": 37})
    torch.manual_seed(0)
    model = build_model("dtn", schema, cfg)
    g = torch.Generator().manual_seed(1)
    cat = torch.stack([torch.randint(0, c, (16,), generator=g) for c in cards], 1)
    return model, FeatureBatch(cat, torch.randn(16, 1, generator=g)), (torch.rand(16, 2, generator=g) < 0.5).float()


def test_modes_issue_fewer_kernels_and_no_host_syncs():
    base, batch, labels = _small()
    counts = {}
    for mode in CL.MODES:
        model = copy.deepcopy(base)
        dtn_kernels.set_kernels(model, mode)
        counts[mode] = CL.count_step(model, batch, labels, train=True)
    ref, fused, grouped = (counts[m] for m in CL.MODES)
    assert ref["triton"] == 0 and fused["triton"] > 0 and grouped["triton"] > 0
    assert grouped["kernels"] < fused["kernels"] < ref["kernels"], {m: c["kernels"] for m, c in counts.items()}
    # grouped: one forward and one backward launch per cross layer for all three MFI modules, one HCNet
    # launch each way for all their HCNets, one mask-block GEMM pair ...
    assert grouped["triton_by_kernel"]["_hcnet_fwd_kernel"] == 1
    assert grouped["triton_by_kernel"]["_gated_cross_fwd_kernel"] == base.cfg.gdcn["num_layers"]
    assert fused["triton_by_kernel"]["_hcnet_fwd_kernel"] == 3 * base.cfg.memonet["num_hcnets"]
    # no mode reads a tensor back to the host in the step (the reference embedding bag's value checks
    # run on the host batch, before the copy, not in the step)
    assert {m: c["host_syncs"] for m, c in counts.items()} == {m: 0 for m in CL.MODES}


def test_reference_embedding_bag_checks_host_ids_and_has_a_sync_free_device_path():
    from torch.profiler import ProfilerActivity, profile

    from dtn_kernels.reference.pt_embedding_bag import device_path, pt_embedding_bag

    w = torch.randn(9, 3, requires_grad=True)
    toff = torch.tensor([0, 4, 9])
    ids, offs = torch.tensor([1, 3, 0, 2, 4, 0]), torch.tensor([0, 1, 3, 5, 6])
    with pytest.raises(RuntimeError, match=r"table 1: id 5 at indices\[3\] \(bag 0\) is outside the table's rows \[0, 5\)"):
        pt_embedding_bag(w, toff, torch.tensor([1, 3, 0, 5, 4, 0]), offs)  # host ids: checked, same message
    expect = pt_embedding_bag(w, toff, ids, offs)
    with device_path():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = pt_embedding_bag(w, toff, ids, offs)
            out.sum().backward()
    names = {e.name.split("::")[-1] for e in prof.events()}
    assert not names & CL.SYNCS, names & CL.SYNCS
    torch.testing.assert_close(out, expect)
    with pytest.raises(RuntimeError, match="offsets must have the dtype of indices"):  # metadata still checked
        with device_path():
            pt_embedding_bag(w, toff, ids, offs.int())


def test_markdown_table():
    row = {"kernels": 10, "aten": 8, "triton": 2, "host_syncs": 0}
    counts = {m: {"train": dict(row), "infer": dict(row)} for m in CL.MODES}
    counts["reference"]["train"]["kernels"] = 30
    text = CL.markdown("dtn", 2048, counts)
    assert "| fused | 10 (8 + 2) | 0.33 | 0 |" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reference_embedding_bag_forward_does_not_sync_on_cuda():
    """The device path on a real GPU: no host sync in the forward (torch's sync debug mode raises on
    one). The backward is ATen's F.embedding_bag backward, whatever it does inside."""
    from dtn_kernels.reference.pt_embedding_bag import pt_embedding_bag

    w = torch.randn(9, 3, device="cuda", requires_grad=True)
    args = [t.cuda() for t in (torch.tensor([0, 4, 9]), torch.tensor([1, 3, 0, 2, 4, 0]), torch.tensor([0, 1, 3, 5, 6]))]
    expect = pt_embedding_bag(w.detach().cpu(), *[t.cpu() for t in args])
    pt_embedding_bag(w, *args)  # warm-up (lazy CUDA initialisation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = pt_embedding_bag(w, *args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.cpu(), expect)
