"""ISTA: Eq. 2 penalties, the proximal step, γ–W rescaling and the monitor."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from fxprune.analysis import analyse, class_costs
from fxprune.errors import UsageError
from fxprune.load import load_source
from fxprune.testing import randomize_batchnorm
from fxprune.trace import trace_model
from fxprune.train.ista import (
    IstaOptimizer,
    Monitor,
    layer_penalties,
    param_groups_for,
    penalty_targets,
    rescale,
    suggest_alpha,
    suggest_rho,
    unscale,
)

torch.set_num_threads(2)


def traced(source: str):
    loaded = load_source(source)
    randomize_batchnorm(loaded.module, seed=1)
    t = trace_model(loaded.module, loaded.example)
    return loaded.module, t.gm, analyse(t.gm)


@pytest.fixture(scope="module")
def convnet():
    return traced("zoo:convnet")


@pytest.fixture(scope="module")
def resnet20():
    return traced("zoo:resnet20")


def eq2(k: int, c_in: int, consumers: list[tuple[int, int]], size: int, image: int = 32) -> float:
    """Eq. 2 by hand: (k·k·c_in + Σ k'·k'·c_out' + I·I) / (I_w^i·I_h^i), the divisor
    being the network's input image size (the same for every layer)."""
    return (k * k * c_in + sum(kk * kk * c for kk, c in consumers) + size * size) / image**2


def test_convnet_penalties_match_eq2(convnet):
    _, gm, analysis = convnet
    lam = layer_penalties(gm, analysis)
    assert lam == pytest.approx(
        {
            "features.1": eq2(5, 3, [(5, 192)], 32),  # conv1 5x5 3->96 at 32x32, conv2 5x5 ->192
            "features.5": eq2(5, 96, [(3, 192)], 16),  # conv2 at 16x16, conv3 3x3 ->192
            "features.9": eq2(3, 192, [(4, 384)], 8),  # fc over 4x4 maps = a 4x4 "conv" -> 384
            "classifier.2": eq2(1, 3072, [(1, 10)], 1),  # fc 3072 -> 384 -> BN -> fc 10
        }
    )
    # The values computed by hand from the paper's Eq. 2 for its ConvNet at 32x32.
    by_hand = {"features.1": 5.761, "features.5": 4.281, "features.9": 7.75, "classifier.2": 3.011}
    assert {k: round(v, 3) for k, v in lam.items()} == by_hand


def test_penalty_divisor_is_the_input_image_size():
    loaded = load_source("zoo:resnet20")
    for side in (16, 32):
        t = trace_model(loaded.module, torch.randn(1, 3, side, side))
        lam = layer_penalties(t.gm, analyse(t.gm))
        # layer3 runs at side/4: (9·64 + 9·64 + (side/4)²) / side²
        assert lam["layer3.1.bn1"] == pytest.approx((2 * 9 * 64 + (side // 4) ** 2) / side**2)


def test_resnet20_penalties_match_eq2(resnet20):
    _, gm, analysis = resnet20
    lam = layer_penalties(gm, analysis)
    expected = {f"layer1.{i}.bn1": eq2(3, 16, [(3, 16)], 32) for i in range(3)}
    expected["layer2.0.bn1"] = eq2(3, 16, [(3, 32)], 16)
    expected |= {f"layer2.{i}.bn1": eq2(3, 32, [(3, 32)], 16) for i in (1, 2)}
    expected["layer3.0.bn1"] = eq2(3, 32, [(3, 64)], 8)
    expected |= {f"layer3.{i}.bn1": eq2(3, 64, [(3, 64)], 8) for i in (1, 2)}
    for name, value in expected.items():
        assert lam[name] == pytest.approx(value), name
    # The stem's residual stream (generalised): 4 producers, 5 consumers, 4 BNs at 32x32,
    # over the same input-image divisor.
    producers = 3 * 9 + 3 * 16 * 9
    consumers = 3 * 9 * 16 + 9 * 32 + 1 * 32
    assert lam["stem.1"] == pytest.approx((producers + consumers + 4 * 1024) / 1024)
    # Stage 3's stream (BNs at 8x8) is divided by 32x32 too, not by 8x8.
    stream = lam["layer3.0.bn2"]
    assert stream == pytest.approx(lam["layer3.1.bn2"]) and stream < 20
    assert len(class_costs(gm, analysis)) == analysis.num_classes


def test_targets_single_bn_groups_by_default(resnet20):
    _, gm, analysis = resnet20
    default = {t.module for t in penalty_targets(gm, analysis)}
    assert default == {f"layer{s}.{b}.bn1" for s in (1, 2, 3) for b in range(3)}
    every = {t.module for t in penalty_targets(gm, analysis, group_ista=True)}
    assert len(every) == 21 and default < every


def ista_setup(model, gm, analysis, lr=0.1, rho=0.01, group_ista=False, momentum=0.0):
    targets = penalty_targets(gm, analysis, group_ista=group_ista)
    sgd = torch.optim.SGD(param_groups_for(model, targets, 5e-4), lr=lr, momentum=momentum)
    return targets, IstaOptimizer(sgd, model, targets, rho, group_ista=group_ista)


def test_prox_soft_thresholds_to_exact_zeros(convnet):
    module, gm, analysis = convnet
    model = copy.deepcopy(module)
    targets, opt = ista_setup(model, gm, analysis, lr=0.1, rho=0.1)
    bn = model.get_submodule("features.9")
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(-0.2, 0.2, 192))
    before = bn.weight.detach().clone()
    opt.zero_grad()
    opt.step()  # no gradients: only the prox acts
    shrink = 0.1 * 0.1 * 7.75
    expected = before.sign() * (before.abs() - shrink).clamp(min=0)
    assert torch.allclose(bn.weight.detach(), expected, atol=1e-6)
    zeros = bn.weight.detach() == 0  # exact zeros, exactly where |γ| ≤ lr·ρ·λ
    assert torch.equal(zeros, before.abs() <= shrink) and zeros.sum() > 0


def test_prox_follows_the_scheduler_lr(convnet):
    module, gm, analysis = convnet
    model = copy.deepcopy(module)
    _, opt = ista_setup(model, gm, analysis, lr=1.0, rho=0.001)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    bn = model.get_submodule("features.1")
    with torch.no_grad():
        bn.weight.fill_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()"
        for _ in range(2):
            opt.zero_grad()
            opt.step()
            sched.step()
    lam = layer_penalties(gm, analysis)["features.1"]
    expected = 1.0 - 1.0 * 0.001 * lam - 0.5 * 0.001 * lam
    assert bn.weight.detach() == pytest.approx(torch.full((96,), expected), abs=1e-6)


def test_gamma_with_weight_decay_is_refused(convnet):
    module, gm, analysis = convnet
    targets = penalty_targets(gm, analysis)
    sgd = torch.optim.SGD(module.parameters(), lr=0.1, weight_decay=1e-4)
    with pytest.raises(UsageError, match="weight_decay"):
        IstaOptimizer(sgd, module, targets, 0.1)


def constant_gamma_gradient(model, opt, name: str, grad: torch.Tensor, steps: int) -> None:
    """`steps` optimizer steps where only γ of `name` has a (fixed) gradient."""
    gamma = model.get_submodule(name).weight
    for _ in range(steps):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        gamma.grad = grad.clone()
        opt.step()


def test_zero_gamma_stays_zero_under_momentum_for_small_gradients(convnet):
    module, gm, analysis = convnet
    model = copy.deepcopy(module)
    targets, opt = ista_setup(model, gm, analysis, lr=0.1, rho=0.01, momentum=0.9)
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.0]  # momentum kept elsewhere
    lam = layer_penalties(gm, analysis)["features.1"]
    bn = model.get_submodule("features.1")
    with torch.no_grad():
        bn.weight.zero_()
    # |∇γ| = 0.9·ρλ: with momentum 0.9 on γ the buffer would reach 9·ρλ and leave zero.
    grad = 0.9 * 0.01 * lam * torch.where(torch.arange(96) % 2 == 0, 1.0, -1.0)
    constant_gamma_gradient(model, opt, "features.1", grad, steps=30)
    assert torch.count_nonzero(bn.weight) == 0
    constant_gamma_gradient(model, opt, "features.1", 1.5 * grad, steps=1)  # above ρλ: it moves
    assert torch.count_nonzero(bn.weight) == 96


def test_gamma_with_momentum_is_refused(convnet):
    module, gm, analysis = convnet
    targets = penalty_targets(gm, analysis)
    groups = param_groups_for(module, targets, 5e-4)
    groups[1]["momentum"] = 0.9
    with pytest.raises(UsageError, match="momentum=0.9"):
        IstaOptimizer(torch.optim.SGD(groups, lr=0.1), module, targets, 0.1)
    with pytest.raises(UsageError, match="Adagrad is not supported"):
        adagrad = torch.optim.Adagrad(param_groups_for(module, targets, 0.0), lr=0.1)
        IstaOptimizer(adagrad, module, targets, 0.1)


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_prox_scales_the_threshold_by_adams_step(convnet, kind):
    module, gm, analysis = convnet
    model = copy.deepcopy(module)
    targets = penalty_targets(gm, analysis)
    groups = param_groups_for(model, targets, 1e-4, adam_beta2=0.999)
    opt = IstaOptimizer(kind(groups, lr=0.01), model, targets, rho=0.01)
    lam = layer_penalties(gm, analysis)["features.1"]
    bn = model.get_submodule("features.1")
    with torch.no_grad():
        bn.weight.zero_()
    # Adam's step is ~lr·sign(g) whatever |g|: an unscaled threshold lr·ρλ would let
    # γ leave zero; scaled by lr/(√v̂+ε) a zero stays zero while |∇γ| ≤ ρλ.
    grad = 0.9 * 0.01 * lam * torch.ones(96)
    constant_gamma_gradient(model, opt, "features.1", grad, steps=20)
    assert torch.count_nonzero(bn.weight) == 0
    grad[:48] *= 2  # above ρλ: those leave zero, the others stay
    constant_gamma_gradient(model, opt, "features.1", grad, steps=5)
    assert torch.count_nonzero(bn.weight[:48]) == 48 and torch.count_nonzero(bn.weight[48:]) == 0
    with pytest.raises(UsageError, match="β1 must be 0"):
        IstaOptimizer(kind(param_groups_for(model, targets, 0.0), lr=0.01), model, targets, 0.1)


def test_group_prox_zeroes_a_residual_channel_everywhere(resnet20):
    module, gm, analysis = resnet20
    model = copy.deepcopy(module)
    targets, opt = ista_setup(model, gm, analysis, lr=1.0, rho=1.0, group_ista=True)
    stream = ["stem.1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"]  # one residual group
    lam = layer_penalties(gm, analysis)["stem.1"]
    with torch.no_grad():
        for t in targets:
            model.get_submodule(t.module).weight.fill_(10.0)
        for name in stream:  # channel 3 of the stream: ‖γ‖ = 0.2 < λ, channel 0: ‖γ‖ = 20
            model.get_submodule(name).weight[3] = 0.1
    opt.zero_grad()
    opt.step()
    for name in stream:
        gamma = model.get_submodule(name).weight.detach()
        assert gamma[3] == 0, name  # gone at every site at once
        assert float(gamma[0]) == pytest.approx(10.0 * (1 - lam / 20.0), rel=1e-5)
    single = model.get_submodule("layer1.0.bn1").weight.detach()  # one site: plain soft threshold
    assert float(single[0]) == pytest.approx(10.0 - layer_penalties(gm, analysis)["layer1.0.bn1"])


def test_optimizer_state_round_trip(convnet):
    module, gm, analysis = convnet
    model = copy.deepcopy(module)
    _, opt = ista_setup(model, gm, analysis, momentum=0.9, rho=0.123)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = opt.state_dict()
    _, again = ista_setup(model, gm, analysis, momentum=0.9, rho=0.0)
    again.load_state_dict(state)
    assert again.rho == 0.123
    assert len(again.state) == len(opt.state) > 0


@pytest.mark.parametrize("name", ["convnet", "resnet20"])
@pytest.mark.parametrize("group_ista", [False, True])
def test_rescale_keeps_the_function(request, name, group_ista):
    module, gm, analysis = request.getfixturevalue(name)
    model = copy.deepcopy(module)
    x = torch.randn(4, 3, 32, 32)
    reference = model.eval()(x).detach()
    refused = rescale(model, gm, analysis, 0.1, group_ista=group_ista)
    assert refused == []
    out = model(x).detach()
    assert float((out - reference).abs().max() / reference.abs().max()) <= 1e-5
    bn = "features.1" if name == "convnet" else "layer1.0.bn1"
    scaled, original = model.get_submodule(bn).weight, module.get_submodule(bn).weight
    assert torch.allclose(scaled, 0.1 * original)
    unscale(model, gm, analysis, 0.1, group_ista=group_ista)
    for (key, a), b in zip(model.state_dict().items(), module.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), key


class Activated(nn.Module):
    """conv-BN-act-conv-BN-ReLU-pool-fc with a chosen first activation."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv2(self.act(self.bn1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn2(x))).flatten(1))


@pytest.mark.parametrize(
    "act", [nn.ReLU6(), nn.SiLU(), nn.Sigmoid()], ids=lambda a: type(a).__name__
)
def test_rescale_refuses_non_homogeneous_paths(act):
    model = Activated(act).eval()
    randomize_batchnorm(model)
    t = trace_model(model, torch.randn(1, 3, 8, 8))
    analysis = analyse(t.gm)
    x = torch.randn(2, 3, 8, 8)
    reference = model(x).detach()
    refused = rescale(model, t.gm, analysis, 0.1)
    assert len(refused) == 1 and refused[0].startswith("bn1:")
    assert type(act).__name__ in refused[0]
    assert torch.allclose(model(x), reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.bn2.weight, t.gm.get_submodule("bn2").weight * 0.1)


def test_monitor_diagnostics_and_suggestions(convnet):
    module, gm, analysis = convnet
    monitor = Monitor(module, penalty_targets(gm, analysis), num_classes=10)
    for epoch, lasso in enumerate([30.0, 20.0, 10.0], 1):
        monitor.history.append({"ce": 1.0 - 0.1 * epoch, "lasso": lasso, "sparsity": 0.0,
                                "layers": {"a": 0.0}, "rho": 1.0})  # fmt: skip
    assert any("decrease α" in w for w in monitor.diagnose())
    monitor.history.append({"ce": 2.3, "lasso": 1.0, "sparsity": 0.95, "layers": {"a": 1.0},
                            "rho": 1.0})  # fmt: skip
    advice = " ".join(monitor.diagnose())
    assert "decrease ρ" in advice and "chance level" in advice
    record = monitor.record(5, ce=0.5, accuracy=0.9)
    assert record["sparsity"] == 0.0 and record["lasso"] > 0 and set(record["layers"]) == {
        "features.1", "features.5", "features.9", "classifier.2"}  # fmt: skip
    assert monitor.to_jsonl().count("\n") == 5
    assert suggest_rho(2.0, 400.0) == 0.005
    assert suggest_alpha(1.0, lr=0.1, lam=10.0, rho=0.001) == pytest.approx(0.1)
    with pytest.raises(UsageError):
        suggest_rho(2.0, 0.0)
