"""The sharding plan: deterministic, balanced, every element of every parameter on exactly one shard."""

from __future__ import annotations

import pytest
import torch

from paramserver.core.params import ParamInfo
from paramserver.core.sharding import CUT_ALIGN_BYTES, cut_points, make_plan, pack, unpack


def infos(shapes, dtype=torch.float32):
    return [ParamInfo(i, f"p{i}", shape, dtype, 0) for i, shape in enumerate(shapes)]


SHAPES = [(300, 20), (20,), (17, 6), (1,), (64, 64), (5, 5, 3), (1000,), (2, 2), (50, 10), (7,)]


def covered_elements(plan):
    seen = {p.index: [] for p in plan.params}
    for slices in plan.shards:
        for s in slices:
            seen[s.param].append((s.start, s.stop))
    return seen


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("split_threshold", [None, 256, 4096])
@pytest.mark.parametrize("allow_split", [False, True])
def test_plan_covers_each_element_once(num_shards, split_threshold, allow_split):
    params = infos(SHAPES)
    plan = make_plan(params, num_shards, split_threshold, allow_split)
    assert plan.num_shards == num_shards
    for p in params:
        ranges = sorted(covered_elements(plan)[p.index])
        assert ranges[0][0] == 0 and ranges[-1][1] == p.numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), f"gaps or overlaps in {p.name}: {ranges}"
        if not allow_split or split_threshold is None:
            assert len(ranges) == 1, f"{p.name} split although splitting is off"


def test_plan_is_deterministic():
    params = infos(SHAPES)
    plans = [make_plan(params, 3, 1024, True) for _ in range(3)]
    assert plans[0] == plans[1] == plans[2]


def test_plan_balances_by_bytes_largest_first():
    # Whole tensors, greedy by size: no shard exceeds the ideal by more than the largest tensor.
    params = infos(SHAPES)
    plan = make_plan(params, 3, None, False)
    loads = plan.shard_bytes()
    largest = max(p.nbytes for p in params)
    assert max(loads) - sum(loads) / 3 <= largest
    # The largest tensor is placed first, alone on shard 0.
    assert plan.shards[0][0].param == max(params, key=lambda p: p.nbytes).index


def test_plan_splitting_improves_balance():
    params = infos([(4096,), (16,), (8,)])
    whole = make_plan(params, 4, None, False)
    split = make_plan(params, 4, 1024, True)
    assert whole.balance() > 3.0
    assert split.balance() < 1.1
    assert split.is_split(0) and not split.is_split(1)
    assert "balance" in split.describe()


@pytest.mark.parametrize(
    ("numel", "pieces", "itemsize", "expected"),
    [
        (4096, 4, 4, [0, 1024, 2048, 3072, 4096]),  # even: the plain quarters are aligned already
        (1000, 4, 2, [0, 256, 512, 768, 1000]),  # bf16: 128 elements a boundary, the nearest to 250, 500, 750
        (102, 3, 4, [0, 64, 102]),  # too small for 3 aligned pieces: 2
        (63, 2, 4, [0, 63]),  # smaller than one boundary: whole
        (10**9 + 7, 3, 4, [0, 333333312, 666666688, 10**9 + 7]),  # integer arithmetic at any size
    ],
)
def test_cut_points_fall_on_aligned_boundaries(numel, pieces, itemsize, expected):
    bounds = cut_points(numel, pieces, itemsize)
    assert bounds == expected
    assert all(b * itemsize % CUT_ALIGN_BYTES == 0 for b in bounds[:-1])


def test_a_cut_tensor_gives_the_bits_of_the_whole_under_fused_adam():
    """torch's fused CPU Adam rounds its scalar tail differently from its vectors: a piece cut anywhere would
    give some elements other bits than the whole tensor does; on the plan's boundaries every element matches."""
    gen = torch.Generator().manual_seed(0)
    numel = 3 * 1000 + 7
    grads = [torch.randn(numel, generator=gen) for _ in range(40)]
    start = torch.randn(numel, generator=gen)

    def train(lo: int, hi: int) -> torch.Tensor:
        p = torch.nn.Parameter(start[lo:hi].clone())
        opt = torch.optim.Adam([p], lr=1e-2, fused=True)
        for g in grads:
            p.grad = g[lo:hi].clone()
            opt.step()
        return p.detach()

    whole = train(0, numel)
    bounds = cut_points(numel, 3, 4)
    pieces = torch.cat([train(lo, hi) for lo, hi in zip(bounds, bounds[1:])])
    assert torch.equal(pieces, whole)


def test_plan_by_bytes_counts_dtypes():
    params = [ParamInfo(0, "a", (100,), torch.float64, 0), ParamInfo(1, "b", (100,), torch.float32, 0), ParamInfo(2, "c", (100,), torch.float32, 0)]
    plan = make_plan(params, 2, None, False)
    assert sorted(plan.shard_bytes()) == [800, 800]


def test_more_shards_than_tensors_leaves_empty_shards():
    plan = make_plan(infos([(3,), (2,)]), 4, None, False)
    assert sorted(len(s) for s in plan.shards) == [0, 0, 1, 1]


def test_pack_unpack_round_trip_with_mixed_dtypes_and_split():
    params = [ParamInfo(0, "a", (40, 3), torch.float32, 0), ParamInfo(1, "b", (7,), torch.float64, 0), ParamInfo(2, "c", (9,), torch.float32, 1)]
    plan = make_plan(params, 3, 100, True)
    tensors = [torch.randn(p.shape, dtype=p.dtype) for p in params]
    out = [torch.zeros(p.shape, dtype=p.dtype) for p in params]
    for j in range(plan.num_shards):
        buffers = pack(plan, j, tensors)
        assert [b.dtype for b in buffers] == [layout.dtype for layout in plan.buffers(j)]
        unpack(plan, j, buffers, out)
    for a, b in zip(tensors, out):
        assert torch.equal(a, b)


def test_pack_gathers_on_the_shards_device_only_where_every_tensor_is_there():
    # "meta" stands in for a GPU: a shard's device other than the CPU
    plan = make_plan(infos([(4, 3), (5,)]), 1, None, False)
    on_meta = [torch.empty(p.shape, device="meta") for p in plan.params]
    assert [b.device.type for b in pack(plan, 0, on_meta, torch.device("meta"))] == ["meta"]
    on_host = [torch.zeros(p.shape) for p in plan.params]
    assert [b.device.type for b in pack(plan, 0, on_host, torch.device("meta"))] == ["cpu"]
    assert [b.device.type for b in pack(plan, 0, on_host)] == ["cpu"]


def test_make_plan_rejects_zero_shards():
    with pytest.raises(ValueError, match="num_shards"):
        make_plan(infos([(3,)]), 0, None, False)
