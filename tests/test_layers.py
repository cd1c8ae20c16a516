"""Every interaction module, the gate and the input layer: shapes, gradients, hand-computed cases."""
import math

import pytest
import torch

from dtn.features import FeatureBatch, FeatureSpec, InputLayer, JaggedField, Schema
from dtn.layers import (GDCN, CrossNetwork, DCNv2, GatedCrossLayer, HCNet, InstanceMask, MaskBlock, MaskNet, MemoNet,
                        SoftmaxGate, build_fim, cross_hash)
from dtn.layers.memonet import fmix32, fmix32_int


def _all_grads(module, out):
    out.sum().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/invalid gradient for {missing}"


@pytest.mark.parametrize("kind", ["gdcn", "dcnv2", "masknet", "memonet"])
@pytest.mark.parametrize("B", [1, 7])
def test_fim_shapes_and_grads(kind, B):
    F_, d, h, C = 5, 3, 11, 4
    opts = {"memonet": {"num_buckets": 37, "codebook_dim": 2, "num_hcnets": 2},
            "masknet": {"mask_hidden": 6, "block_dim": 9, "num_blocks": 2}}.get(kind, {})
    fim = build_fim(kind, F_, d, h, C, opts)
    E = torch.randn(B, F_, d, requires_grad=True)
    ids = torch.randint(0, 10, (B, C))
    out = fim(E, ids)
    assert out.shape == (B, h)
    _all_grads(fim, out)
    assert E.grad is not None and E.grad.abs().sum() > 0


def test_masknet_parallel_shapes():
    m = MaskNet(4, 3, 10, mode="parallel", num_blocks=3, mask_hidden=5, block_dim=6, parallel_hidden=(7,))
    out = m(torch.randn(2, 4, 3))
    assert out.shape == (2, 10)
    _all_grads(m, out)
    with pytest.raises(ValueError, match="serial"):
        MaskNet(4, 3, 10, mode="diagonal")


def test_gated_cross_layer_hand_computed():
    layer = GatedCrossLayer(2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
        layer.bias.copy_(torch.tensor([0.5, 1.0]))
        layer.gate_weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    x0 = torch.tensor([[2.0, 3.0]])
    xl = torch.tensor([[1.0, -1.0]])
    # W xl + b = [1 - 2 + 0.5, 0 + 1 + 1] = [-0.5, 2];  gate = sigmoid([0, 0]) = [0.5, 0.5]
    # c = x0 * (W xl + b) * gate + xl = [2 * -0.5 * 0.5 + 1, 3 * 2 * 0.5 - 1] = [0.5, 2]
    torch.testing.assert_close(layer(x0, xl), torch.tensor([[0.5, 2.0]]))
    ungated = GatedCrossLayer(2, gated=False)
    with torch.no_grad():
        ungated.weight.copy_(layer.weight)
        ungated.bias.copy_(layer.bias)
    torch.testing.assert_close(ungated(x0, xl), torch.tensor([[2 * -0.5 + 1, 3 * 2.0 - 1]]))
    assert ungated.gate_weight is None


def test_cross_network_recurrence_uses_x0():
    net = CrossNetwork(3, num_layers=2)
    e = torch.randn(4, 3)
    c1 = net.layers[0](e, e)
    torch.testing.assert_close(net(e), net.layers[1](e, c1))
    assert isinstance(DCNv2(2, 2, 3).cross.layers[0].gate_weight, type(None))
    assert GDCN(2, 2, 3).cross.layers[0].gate_weight is not None


def test_mask_block_hand_computed():
    block = MaskBlock(input_dim=2, value_dim=2, mask_hidden=1, output_dim=2)
    with torch.no_grad():
        block.mask.fc1.weight.copy_(torch.tensor([[1.0, 1.0]]))
        block.mask.fc1.bias.zero_()
        block.mask.fc2.weight.copy_(torch.tensor([[1.0], [2.0]]))
        block.mask.fc2.bias.copy_(torch.tensor([0.0, 1.0]))
        block.hidden.weight.copy_(torch.eye(2))
    e = torch.tensor([[1.0, 2.0]])
    v = torch.tensor([[1.0, -1.0]])
    # fc1: relu(3) = 3; mask = [3, 7]; mask * v = [3, -7]; LN([3, -7]) = [1, -1] (eps aside); relu -> [1, 0]
    out = block(e, v)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0]]), atol=1e-4, rtol=0)
    im = InstanceMask(2, 1, 2)
    with torch.no_grad():
        im.load_state_dict(block.mask.state_dict())
    torch.testing.assert_close(im(e), torch.tensor([[3.0, 7.0]]))


def test_fmix32_matches_python_and_murmur_constants():
    xs = [0, 1, 2, 12345, 0xDEADBEEF, 0xFFFFFFFF]
    got = fmix32(torch.tensor(xs, dtype=torch.long)).tolist()
    assert got == [fmix32_int(x) for x in xs]
    # murmur3's fmix32 of 1 (a published test value of the finaliser)
    assert fmix32_int(1) == 0x514E28B7
    assert all(0 <= g <= 0xFFFFFFFF for g in got)


def test_cross_hash_is_deterministic_and_spreads():
    ids_i = torch.arange(1000) % 37
    ids_j = torch.arange(1000) // 37
    b1 = cross_hash(ids_i, ids_j, 11, 22, 7, 97)
    b2 = cross_hash(ids_i.clone(), ids_j.clone(), 11, 22, 7, 97)
    assert torch.equal(b1, b2)
    assert b1.min() >= 0 and b1.max() < 97
    assert len(torch.unique(b1)) > 80  # 1000 distinct crosses spread over most of 97 buckets
    assert not torch.equal(b1, cross_hash(ids_i, ids_j, 11, 22, 8, 97))  # another seed, another hash


def test_hcnet_hand_computed():
    """Two fields, one cross: U_0 = U_1 = w * W_o [cw_1 ; cw_2]."""
    net = HCNet(fields=[0, 1], num_fields=2, embed_dim=2, num_hashes=2, num_buckets=5, codebook_dim=1)
    assert net.num_crosses == 1
    ids = torch.tensor([[3, 4]])
    idx = net.buckets(ids)[0, 0]  # [H]
    with torch.no_grad():
        net.codebook.copy_(torch.arange(5.0).view(1, 5, 1))  # codeword of bucket k is [k]
        net.restore.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    E = torch.randn(1, 2, 2)
    w = net.attention(E)[0, 0]
    v = torch.tensor([float(idx[0]), 2.0 * float(idx[1])])
    expected = (w * v).expand(1, 2, 2)
    torch.testing.assert_close(net(E, ids), expected)


def test_hcnet_shrink_sums_crosses_of_each_field():
    net = HCNet(fields=[0, 1, 2], num_fields=3, embed_dim=2, num_buckets=13, codebook_dim=2, shared_codebook=False)
    E, ids = torch.randn(4, 3, 2), torch.randint(0, 6, (4, 3))
    idx = net.buckets(ids)
    cw = torch.stack([net.codebook[h][idx[..., h]] for h in range(2)], 2)
    v = net.restore(cw.flatten(2))
    w = net.attention(E)
    pairs = [(0, 1), (0, 2), (1, 2)]
    U = torch.zeros(4, 3, 2)
    for k, (i, j) in enumerate(pairs):
        U[:, i] += w[:, k, None] * v[:, k]
        U[:, j] += w[:, k, None] * v[:, k]
    torch.testing.assert_close(net(E, ids), U)


def test_memonet_field_validation():
    with pytest.raises(ValueError, match="not categorical field positions"):
        MemoNet(4, 2, 3, num_categorical=2, fields=[0, 5])


def test_softmax_gate_hand_computed_and_mask():
    gate = SoftmaxGate(1, 2)
    with torch.no_grad():
        gate.linear.weight.copy_(torch.tensor([[1.0], [0.0]]))
        gate.linear.bias.zero_()
    x = torch.tensor([[math.log(3.0)]])  # logits [ln 3, 0] -> weights [0.75, 0.25]
    experts = torch.tensor([[[4.0, 0.0], [0.0, 8.0]]])
    out, w = gate(x, experts)
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25]]))
    torch.testing.assert_close(out, torch.tensor([[3.0, 2.0]]))
    out, w = gate(x, experts, mask=torch.tensor([False, True]))
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 8.0]]))


def test_input_layer(tiny_schema, tiny_batch):
    batch, _ = tiny_batch
    layer = InputLayer(tiny_schema, embed_dim=3)
    E = layer(batch)
    assert E.shape == (8, 6, 3)
    assert layer.field_names == ["a", "b", "c", "m", "x", "y"]
    # categorical field b of row 0 is row offset(b) + id of the one weight buffer
    torch.testing.assert_close(E[0, 1], layer.weight[5 + int(batch.categorical[0, 1])])
    # an empty bag pools to zeros; numeric = value * v + b
    torch.testing.assert_close(E[1, 3], torch.zeros(3))
    torch.testing.assert_close(E[:, 4], batch.numeric[:, :1] * layer.numeric_weight[0] + layer.numeric_bias[0])
    _all_grads(layer, E)


def test_input_layer_rejects_bad_ids(tiny_schema, tiny_batch):
    batch, _ = tiny_batch
    layer = InputLayer(tiny_schema, embed_dim=3)
    bad = batch.categorical.clone()
    bad[3, 1] = 7
    with pytest.raises(IndexError, match=r"feature 'b': id 7 at row 3 is outside its table \[0, 7\)"):
        layer(FeatureBatch(bad, batch.numeric, batch.multi))
    bad = batch.categorical.clone()
    bad[0, 0] = -1
    with pytest.raises(IndexError, match="feature 'a': id -1 at row 0"):
        layer(FeatureBatch(bad, batch.numeric, batch.multi))
    m = batch.multi[0]
    with pytest.raises(IndexError, match="feature 'm': id 9"):
        layer(FeatureBatch(batch.categorical, batch.numeric, (JaggedField(torch.full_like(m.values, 9), m.offsets),)))
    with pytest.raises(TypeError, match="int32/int64"):
        layer(FeatureBatch(batch.categorical.float(), batch.numeric, batch.multi))
    with pytest.raises(TypeError, match="floating point"):
        layer(FeatureBatch(batch.categorical, batch.numeric.long(), batch.multi))
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        layer(FeatureBatch(batch.categorical[:, :2], batch.numeric, batch.multi))


def test_input_layer_needs_fitted_cardinality():
    with pytest.raises(ValueError, match="feature 'a': cardinality"):
        InputLayer(Schema([FeatureSpec("a")], labels=["t"]), 4)


def test_hcnet_buckets_equal_cross_hash():
    net = HCNet(fields=[2, 0, 3], num_fields=4, embed_dim=2, num_hashes=3, num_buckets=1009, codebook_dim=2)
    ids = torch.randint(0, 50, (6, 4))
    got = net.buckets(ids)
    for k, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]):
        fi, fj = [2, 0, 3][i], [2, 0, 3][j]
        for h, seed in enumerate(net.seeds):
            want = cross_hash(ids[:, fi], ids[:, fj], int(net.salts[i]), int(net.salts[j]), seed, 1009)
            assert torch.equal(got[:, k, h], want)
