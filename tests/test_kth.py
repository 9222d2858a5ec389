"""The exact k-th engine: order-preserving int32 keys of floats and the radix select over them."""

import math

import pytest
import torch
from helpers.oracles import keys64

from lightning_masks.selection.kth import PROTECTED, PRUNED, float_keys, kth_key


def test_keys_preserve_float_order():
    values = torch.tensor([-math.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.5, math.inf])
    keys = keys64(values)
    assert torch.all(keys[1:] >= keys[:-1]) and keys.min() >= 0 and keys.max() < 2**32


def test_int32_keys_are_the_int64_keys_shifted():
    values = torch.tensor([-math.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.5, math.inf])
    values = torch.cat([values, torch.randn(1000) * 10 ** torch.randint(-30, 30, (1000,)).float()])
    assert torch.equal(float_keys(values).long(), keys64(values) - 2**31)
    assert PRUNED < int(float_keys(torch.tensor([-math.inf])))
    assert PROTECTED > int(float_keys(torch.tensor([math.inf])))


@pytest.mark.parametrize("seed", range(6))
def test_kth_key_matches_a_sort_with_ties_and_extremes(seed):
    generator = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(-2**31, 2**31, (n,), generator=generator, dtype=torch.int64).to(torch.int32)
              for n in (700, 1, 300)]
    pieces[0][:200] = PRUNED  # the lowest possible key, bucket 0
    pieces[2][:50] = PROTECTED  # the highest, bucket 2^16 - 1
    pieces[1][:] = 12345
    pieces[0][200:260] = 12345  # ties across tensors
    pieces[2][50:60] = 12345 + 65536 * 3  # same low bits, another bucket
    everything = torch.sort(torch.cat(pieces)).values
    for k in (1, 150, 200, 201, 230, 400, 500, 950, 951, 1001):
        key, below, equal = kth_key(lambda: iter(pieces), k)
        assert key == int(everything[k - 1])
        assert below == int((everything < key).sum()) and equal == int((everything == key).sum())
