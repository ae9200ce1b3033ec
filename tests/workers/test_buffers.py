"""The worker's flat per-shard buffers: gradients and weights as views, packing equal to the plan's."""

from __future__ import annotations

import torch

from paramserver.core.params import normalize_params
from paramserver.core.sharding import make_plan, pack
from tests.helpers.reference import make_model
from workers.buffers import ShardBuffers


def setup(split_threshold=64):
    model = make_model()
    groups = normalize_params(model.named_parameters())
    plan = make_plan(groups.params, 3, split_threshold, allow_split=True)
    return model, plan, ShardBuffers(plan, groups.tensors)


def test_backward_writes_gradients_into_the_push_buffers():
    model, plan, buffers = setup()
    params = list(model.parameters())
    model(torch.randn(5, 6)).sum().backward()
    expected = [[b.clone() for b in pack(plan, j, [p.grad for p in params])] for j in range(plan.num_shards)]
    viewed = [i for i in range(len(params)) if i in buffers.viewed]
    assert viewed and all(params[i].grad.data_ptr() == buffers.grad_view(i).data_ptr() for i in viewed)
    got = buffers.gather_grads()
    for want_shard, got_shard in zip(expected, got):
        for a, b in zip(want_shard, got_shard):
            assert torch.equal(a, b)
    buffers.zero_grads()
    assert all(float(b.abs().sum()) == 0.0 for shard in buffers.grads for b in shard)


def test_replaced_or_missing_gradients_are_copied_in_and_repointed():
    model, plan, buffers = setup(split_threshold=None)
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = None
    buffers.gather_grads()
    assert torch.equal(buffers.grad_view(0), torch.ones_like(params[0]))
    assert params[0].grad.data_ptr() == buffers.grad_view(0).data_ptr()
    assert float(buffers.grad_view(1).abs().sum()) == 0.0


def test_weights_received_into_the_buffers_are_the_model_weights():
    model, plan, buffers = setup()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    for j in range(plan.num_shards):
        new = pack(plan, j, [b + 1 for b in before])
        for dst, src in zip(buffers.weights[j], new):
            dst.copy_(src)
    buffers.scatter_weights()  # split pieces are copied; whole parameters already see the new values
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b + 1)


def test_rebound_data_is_pointed_back_and_a_changed_dtype_is_an_error():
    import pytest

    model, plan, buffers = setup(split_threshold=None)
    params = list(model.parameters())
    params[0].data = torch.zeros_like(params[0])  # e.g. vector_to_parameters or an EMA swap
    buffers.scatter_weights()
    assert params[0].data_ptr() == buffers.weight_view(0).data_ptr()
    model.double()
    with pytest.raises(ValueError, match="is now torch.float64"):
        buffers.gather_grads()


def test_placing_a_shards_buffers_elsewhere_moves_values_and_views_and_back():
    model, plan, buffers = setup()
    params = list(model.parameters())
    model(torch.randn(5, 6)).sum().backward()
    grads_before = [p.grad.clone() for p in params]
    weights_before = [p.detach().clone() for p in params]
    params[-1].grad = None  # no gradient: stays None wherever the buffers go
    on_shard = [i for i, (j, _, _) in buffers.viewed.items() if j == 0]
    assert on_shard
    layouts = plan.buffers(0)
    grads = [torch.empty(l.numel, dtype=l.dtype) for l in layouts]
    weights = [torch.empty(l.numel, dtype=l.dtype) for l in layouts]
    buffers.place(0, grads, weights)
    assert buffers.elsewhere == {0}
    for i in on_shard:
        assert params[i].data_ptr() == buffers.weight_view(i).data_ptr()
        assert params[i].untyped_storage().data_ptr() == weights[buffers.viewed[i][1]].untyped_storage().data_ptr()
        assert params[i].grad is None if i == len(params) - 1 else params[i].grad.data_ptr() == buffers.grad_view(i).data_ptr()
    for i, p in enumerate(params):  # the values went along
        assert torch.equal(p.detach(), weights_before[i])
        if p.grad is not None:
            assert torch.equal(p.grad, grads_before[i])
    held = [torch.full((l.numel,), 7.0, dtype=l.dtype) for l in layouts]  # buffers that hold the job's weights already
    buffers.place(0, grads, held, weights_hold_values=True)
    assert all(bool(params[i].eq(7.0).all()) for i in on_shard)
    buffers.place(0)  # back into memory of its own, the values along
    assert buffers.elsewhere == set()
    assert all(bool(params[i].eq(7.0).all()) and params[i].untyped_storage().data_ptr() != held[0].untyped_storage().data_ptr() for i in on_shard)
