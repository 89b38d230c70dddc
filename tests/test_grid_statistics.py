"""The statistics behind the CIFAR-10 grid's verdicts (benchmarks/cifar10_grid.py): what it calls a win must be."""

import itertools
import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from cifar10_grid import permutation_p, summarise, verdicts  # noqa: E402


@pytest.mark.parametrize('n_a,n_b', [(3, 3), (5, 5), (3, 5)])
def test_permutation_p_of_fully_separated_arms_is_the_tests_floor(n_a, n_b):
    # only the observed split and its mirror image (for equal sizes) are as extreme
    a, b = [90.0 + i for i in range(n_a)], [80.0 + i for i in range(n_b)]
    floor = (2 if n_a == n_b else 1) / math.comb(n_a + n_b, n_a)
    assert permutation_p(a, b) == pytest.approx(floor)
    assert permutation_p(b, a) == pytest.approx(floor)


def test_permutation_p_matches_a_count_over_relabellings():
    rng = random.Random(0)
    a, b = [rng.gauss(85, 1) for _ in range(4)], [rng.gauss(84, 1) for _ in range(4)]
    pooled, observed = a + b, abs(sum(a) / 4 - sum(b) / 4)
    extreme = 0
    for labels in itertools.product([0, 1], repeat=8):  # every labelling, kept where it has 4 of each
        if sum(labels) == 4:
            x = [v for v, lab in zip(pooled, labels) if lab]
            y = [v for v, lab in zip(pooled, labels) if not lab]
            extreme += abs(sum(x) / 4 - sum(y) / 4) >= observed - 1e-9
    assert permutation_p(a, b) == pytest.approx(extreme / math.comb(8, 4))
    assert permutation_p(a, a) == 1.0


def _cells(arm, top1):
    return [{'ratio': 0.5, 'arm': arm, 'seed': i, 'gmacs': 0.016, 'top1': t} for i, t in enumerate(top1)]


def test_verdicts_call_a_win_only_past_twice_the_combined_std():
    # std 1 in each arm: the bar is 2 * sqrt(2) = 2.83 points
    kpid = _cells('kpid', [85.0, 86.0, 87.0])
    close, far = _cells('kpid_ce', [82.5, 83.5, 84.5]), _cells('tp_taylor', [82.0, 83.0, 84.0])
    lines = verdicts(summarise(kpid + close + far))
    assert any('CE only' in line and '(+2.50' in line and 'ties' in line for line in lines)
    assert any('Torch-Pruning' in line and '(+3.00' in line and 'wins' in line for line in lines)
    # the knapsack's selection alone (CE only) against Torch-Pruning under the same fine-tune: +0.50, a tie
    assert any(
        line.startswith("- 50%: KPID's selection alone 83.50 vs Torch-Pruning") and '(+0.50' in line and 'ties' in line
        for line in lines
    )
    assert len(lines) == 3
    with_p = verdicts(summarise(kpid + far), kpid + far)
    assert len(with_p) == 1 and 'p = 0.100' in with_p[0]  # 3 + 3 fully separated runs: the floor, 2 / 20
