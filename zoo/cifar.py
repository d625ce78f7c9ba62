"""The paper's CIFAR-10 models: the ConvNet and the CIFAR ResNets.

Both take a 1x3x32x32 input and return 10 logits. Every conv is followed by a
BatchNorm (the γ the ISTA penalty acts on) and, where the paper has one, a
ReLU; convs that feed a BatchNorm carry no bias because the BN's β replaces it.
ReLUs are not in-place, so every node's output stays readable after the
forward pass (the compiler probes channel values node by node).

Parameter counts (``sum(p.numel() for p in model.parameters())``, asserted in
tests/test_zoo.py; BN running statistics are buffers, not parameters):

- ``convnet``: 1,985,002 (paper: 1,986,760). Both share the 1,983,264 weights
  of conv 5x5 96, conv 5x5 192, conv 3x3 192, fc 3072->384 and fc 384->10.
  As in the paper, every layer but the last is batch-normalised (the fc 384
  too: its Table 1 prunes it to 128), so the first four layers have no bias and
  a BN γ, β each (2 x 864 = 1,728), and the last fc a bias (10). The paper's
  figure is the weights plus exactly 4 numbers per output unit of all five
  layers (4 x 874 = 3,496), which fits a TensorFlow count of γ, β, moving mean
  and moving variance after every layer; counting our BN running statistics
  (buffers here, 2 x 864) gives 1,986,730, 30 short of it. The paper does not
  say how it counted, so this is our reading, not a fact.
- ``resnet20``: 272,474 (paper: 281,304; He et al. 2016 report "0.27M"). He
  et al.'s CIFAR ResNets use option A shortcuts (a strided slice and zero
  channel padding, no parameters); Ye et al. only say they prune the channels
  inside residual modules, which either option allows. We use option B: the
  two downsampling blocks get a 1x1 conv + BN projection (2,560 weights + 192
  BN parameters), so torch.fx sees a real conv producing the shortcut
  channels. Option A would give 269,722. Counting the BN running statistics
  too (the paper's ConvNet figure does) gives 271,098 (option A) or 274,042
  (option B); we could not reconstruct 281,304 from any of these readings.

No module has control flow that depends on tensor values, so all of them
trace with ``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model

CIFAR_INPUT = (1, 3, 32, 32)


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same' padding) -> BN -> ReLU, the unit the paper prunes."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvNet(nn.Module):
    """The paper's CIFAR-10 ConvNet: three conv-BN-ReLU-maxpool stages, fc-BN-ReLU 384, fc 10.

    Max-pooling 3x3 stride 2 padding 1 halves 32 -> 16 -> 8 -> 4, so the
    first fc layer sees 192 x 4 x 4 = 3072 features as in the paper.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        pool = dict(kernel_size=3, stride=2, padding=1)
        self.features = nn.Sequential(
            *conv_bn_relu(3, 96, 5),
            nn.MaxPool2d(**pool),
            *conv_bn_relu(96, 192, 5),
            nn.MaxPool2d(**pool),
            *conv_bn_relu(192, 192, 3),
            nn.MaxPool2d(**pool),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (N, 192, 4, 4) -> (N, 3072)
            nn.Linear(192 * 4 * 4, 384, bias=False),
            nn.BatchNorm1d(384),  # the paper normalises every layer but the last
            nn.ReLU(),
            nn.Linear(384, num_classes),
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """He et al.'s two-conv residual block; option B projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): conv 16, three stages of n blocks (16, 32, 64), pool, fc."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*conv_bn_relu(3, 16, 3))
        self.layer1 = make_stage(16, 16, n, stride=1)
        self.layer2 = make_stage(16, 32, n, stride=2)
        self.layer3 = make_stage(32, 64, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()  # (N, 64, 1, 1) -> (N, 64)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def make_stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks; only the first one changes width or resolution."""
    layers = [BasicBlock(c_in, c_out, stride)]
    layers += [BasicBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), BN γ=1 β=0, PyTorch-default Linear.

    BN γ is never zero-initialised: under ISTA a zero γ means a dead channel.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model("convnet", input_shape=CIFAR_INPUT, kind="cifar")
def convnet(num_classes: int = 10) -> nn.Module:
    """The paper's CIFAR-10 ConvNet (conv 96-192-192, fc 384), BN after every layer but the last."""
    return ConvNet(num_classes)


@register_model("resnet20", input_shape=CIFAR_INPUT, kind="cifar")
def resnet20(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016), option B projection shortcuts."""
    return CifarResNet(20, num_classes)


@register_model("resnet32", input_shape=CIFAR_INPUT, kind="cifar")
def resnet32(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-32 (He et al. 2016), option B projection shortcuts."""
    return CifarResNet(32, num_classes)


@register_model("resnet56", input_shape=CIFAR_INPUT, kind="cifar")
def resnet56(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-56 (He et al. 2016), option B projection shortcuts."""
    return CifarResNet(56, num_classes)


@register_model("resnet110", input_shape=CIFAR_INPUT, kind="cifar")
def resnet110(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-110 (He et al. 2016), option B projection shortcuts."""
    return CifarResNet(110, num_classes)


__all__ = [
    "BasicBlock",
    "CIFAR_INPUT",
    "CifarResNet",
    "ConvNet",
    "conv_bn_relu",
    "convnet",
    "init_weights",
    "make_stage",
    "resnet110",
    "resnet20",
    "resnet32",
    "resnet56",
]
