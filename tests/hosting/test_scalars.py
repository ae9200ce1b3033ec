"""Scalars across Ray calls (paramserver.hosting.scalars): every 0-d tensor of a step's control calls comes back
bit for bit, with its dtype; anything else travels as it is. No Ray needed."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from paramserver.hosting.scalars import Scalar, pack_scalars, unpack_scalars


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_a_scalar_comes_back_bit_for_bit(dtype):  # -0.0 and subnormals included
    values = torch.tensor([0.1, -0.0, -3.3e-8, float("inf"), float("nan"), 65504.0, 1e-40]).to(dtype) if dtype.is_floating_point else torch.tensor([0, 1, 7]).to(dtype)
    for value in values:
        back = unpack_scalars(pack_scalars(value))
        assert back.dtype == dtype and back.dim() == 0
        if dtype.is_floating_point and value.isnan():
            assert back.isnan()  # a NaN stays a NaN (its payload bits aside)
        else:
            assert back.view(-1).view(torch.uint8).tolist() == value.view(-1).view(torch.uint8).tolist()


def test_containers_are_walked_and_the_rest_travels_as_it_is():
    Pair = namedtuple("Pair", "a b")
    big = torch.arange(3.0)
    record = {"update": {"clip_coef": torch.tensor(0.25), "hyperparameters": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
              "norms": ([0, 1], [torch.tensor(2.0), None]), "big": big, "pair": Pair(torch.tensor(1.0), 2)}
    packed = pack_scalars(record)
    assert packed["update"]["clip_coef"] == Scalar(0.25, "float32")
    assert packed["norms"] == ([0, 1], [Scalar(2.0, "float32"), None])
    assert packed["big"] is big and packed["pair"] is record["pair"]  # not a 0-d tensor; not a plain tuple
    back = unpack_scalars(packed)
    assert torch.equal(back["update"]["clip_coef"], torch.tensor(0.25)) and back["update"]["hyperparameters"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]
    assert back["norms"][0] == [0, 1] and torch.equal(back["norms"][1][0], torch.tensor(2.0)) and back["norms"][1][1] is None
    assert unpack_scalars(pack_scalars(None)) is None
