"""What an ensemble shows its user: mean and spread in predict, evaluate, plots and ONNX."""

import torch

from nnfit.metrics import spread_metrics


def test_spread_metrics_known_answers():
    true = torch.zeros(4, 1, dtype=torch.float64)
    # Members whose mean errs by 0.1, 0.2, 0.3, 0.4 and whose std grows with the error: a perfect ranking.
    offsets = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).reshape(4, 1)
    spreads = torch.tensor([0.01, 0.2, 0.5, 0.1], dtype=torch.float64).reshape(4, 1)
    members = torch.stack([offsets - spreads, offsets + spreads])  # mean = offsets, std = spreads * sqrt(2)
    m = spread_metrics(members, true)
    std = spreads * 2 ** 0.5
    assert abs(m["mean_std"] - float(std.mean())) < 1e-12
    # |error| ranks 0,1,2,3; std ranks 0,2,3,1: Spearman 1 - 6 * (0 + 1 + 1 + 4) / (4 * 15) = 0.4
    assert abs(m["spearman"] - 0.4) < 1e-12
    # within 2 std: 0.1 <= 0.028? no; 0.2 <= 0.566 yes; 0.3 <= 1.41 yes; 0.4 <= 0.283 no
    assert m["coverage_2sigma"] == 0.5


def test_spread_metrics_ties_share_ranks():
    true = torch.zeros(3, 1)
    members = torch.stack([torch.tensor([[1.0], [1.0], [2.0]]) - 1, torch.tensor([[1.0], [1.0], [2.0]]) + 1])
    m = spread_metrics(members, true)  # |error| 1, 1, 2 with equal std: no relation, not a crash
    assert m["spearman"] == 0.0


def test_ensemble_metrics_mean_members_and_median():
    from nnfit.metrics import ensemble_metrics

    true = torch.zeros(2, 1, dtype=torch.float64)
    members = torch.tensor([[[1.0], [1.0]], [[-1.0], [-1.0]], [[3.0], [3.0]]], dtype=torch.float64)
    m = ensemble_metrics(members, true)
    assert [x["mse"] for x in m["members"]] == [1.0, 1.0, 9.0]
    assert m["median_member_mse"] == 1.0
    assert m["mean"]["mse"] == 1.0  # the mean is 1 everywhere
