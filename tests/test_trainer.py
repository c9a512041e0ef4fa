"""The optimizers a trial builds: fused kernels where torch has them, the same steps as torch's default loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autotransfer import trainer
from autotransfer.trainer import make_optimizer


def steps(model: nn.Module, optimizer: torch.optim.Optimizer, count: int = 5) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        inputs, labels = torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_adam_adamw_and_sgd_run_fused_and_step_like_the_default_loop(name, monkeypatch):
    torch.manual_seed(0)
    # no bias before a BatchNorm: its gradient is rounding noise, which Adam scales up to full steps
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    reference = copy.deepcopy(model)
    fused = make_optimizer(name, model.parameters(), 1e-2)
    monkeypatch.setattr(trainer, "FUSED_DEVICES", frozenset())  # as on a device without the kernel
    default = make_optimizer(name, reference.parameters(), 1e-2)
    assert fused.defaults["fused"] is True and not default.defaults["fused"]
    for ours, theirs in zip(steps(model, fused).parameters(), steps(reference, default).parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_rmsprop_keeps_its_default_loop():
    optimizer = make_optimizer("rmsprop", nn.Linear(4, 2).parameters(), 1e-3)
    assert isinstance(optimizer, torch.optim.RMSprop) and not optimizer.defaults.get("fused")


def test_an_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="'lamb'"):
        make_optimizer("lamb", nn.Linear(4, 2).parameters(), 1e-3)


def test_label_smoothing_reaches_the_loss_every_path_trains_with():
    """--label-smoothing: `fit` (the loop of the plain, features and boundary paths) minimises the smoothed
    cross-entropy. A confident, correct head costs almost nothing unsmoothed, and about a fifth of its
    logit gap with smoothing 0.4 over two classes."""
    from autotransfer.trainer import FitSettings, Trainee, fit

    def run(smoothing: float) -> float:
        head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.eye(2) * 10)  # logits: 10 for the true class, 0 for the other
        inputs, labels = torch.eye(2).repeat(4, 1), torch.tensor([0, 1] * 4)
        trainee = Trainee(head, 8, lambda epoch, generator: [(inputs, labels)], lambda: 1.0)
        settings = FitSettings("sgd", 1e-9, 1, 8, torch.device("cpu"), 0, label_smoothing=smoothing)
        return fit(trainee, settings)[0].train_loss

    assert run(0.0) < 1e-3
    assert run(0.4) == pytest.approx(0.4 * 0.5 * 10, rel=0.01)


def test_a_label_smoothing_outside_zero_to_one_is_refused():
    from autotransfer.config import SearchConfig
    from autotransfer.errors import UserError

    assert SearchConfig(dataset="builtin:digits", label_smoothing=0.1).validate().label_smoothing == 0.1
    for bad in (-0.1, 1.0):
        with pytest.raises(UserError, match=r"--label-smoothing must lie in \[0, 1\), got"):
            SearchConfig(dataset="builtin:digits", label_smoothing=bad).validate()
