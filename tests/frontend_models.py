"""Small models written the way timm, Ultralytics and Hugging Face write theirs
(tests/ is on PYTHONPATH, so the CLI loads them as `frontend_models:NAME`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass that calls F.batch_norm itself."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         False, 0.1, self.eps)  # fmt: skip
        return self.act(x)


class SameConv(nn.Conv2d):
    """timm's Conv2dSame: F.conv2d on its own weight after explicit padding logic."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, (1, 1), self.dilation, self.groups)


class TimmLike(nn.Module):
    input_shape = (1, 3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = SameConv(3, 16, 3)
        self.bn1 = BatchNormAct(16)
        self.conv2 = nn.Conv2d(16, 12, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.head(x.mean((2, 3)))


class SharedWeight(nn.Module):
    """One weight read by two functional convs: not one module, so frozen."""

    input_shape = (1, 4, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        w = self.conv.weight
        return self.bn(F.conv2d(F.conv2d(x, w, None, 1, 1), w, None, 1, 1))


class YoloLike(nn.Module):
    """`forward(x, *args, **kwargs)`, a C2f-style `list(chunk)` + cat, a shape check
    (`if self.shape != x.shape`) and a dict output: plain fx follows neither the
    list nor the check, fx with meta values (trace/meta_proxy.py) follows both."""

    input_shape = (1, 3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.SiLU())  # fmt: skip
        self.m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                               nn.SiLU())  # fmt: skip
        self.cv2 = nn.Sequential(nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.up = nn.Upsample(scale_factor=2.0)
        self.head = nn.Conv2d(16, 6, 1)
        self.shape = None

    def forward(self, x, *args, **kwargs):
        y = list(self.stem(x).chunk(2, 1))
        y.append(self.m(y[-1]))
        x = self.cv2(torch.cat(y, 1))
        x = F.max_pool2d(self.up(x), 2)
        if self.shape != x.shape:  # Ultralytics' Detect rebuilds anchors this way
            self.shape = x.shape
        return {"boxes": self.head(x), "features": x}


class IntSizeLike(YoloLike):
    """YoloLike that also turns a traced size into a Python int, as code written for
    eager mode does: fx cannot follow `int()`, torch.export can."""

    def forward(self, x, *args, **kwargs):
        out = super().forward(x)
        half = int(out["features"].shape[-1] // 2)
        return {"boxes": out["boxes"], "features": out["features"][..., :half]}


class HfLike(nn.Module):
    """`forward(pixel_values, labels=None, return_dict=None)` as in transformers."""

    input_shape = (1, 3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, pixel_values, labels=None, return_dict=None):
        hidden = torch.relu(self.norm(self.conv(pixel_values)))
        logits = self.classifier(hidden.mean((2, 3)))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"logits": logits} if loss is None else {"loss": loss, "logits": logits}


def _half_gamma(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.normal_(generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
                module.bias.normal_(generator=gen)
                module.weight[::2] = 0.0
    return model


def timm_like() -> nn.Module:
    return _half_gamma(TimmLike())


def yolo_like() -> nn.Module:
    return _half_gamma(YoloLike())


def int_size_like() -> nn.Module:
    return _half_gamma(IntSizeLike())


# The real libraries, small and offline (the CLI tests skip when one is missing).
def timm_resnet18() -> nn.Module:
    import timm

    model = _half_gamma(timm.create_model("resnet18", pretrained=False, num_classes=10))
    model.input_shape = (1, 3, 64, 64)
    return model


def timm_efficientnet() -> nn.Module:
    import timm

    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    model.input_shape = (1, 3, 64, 64)
    return _half_gamma(model)


def yolov8n() -> nn.Module:
    import os

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel

    model = _half_gamma(DetectionModel("yolov8n.yaml", verbose=False))
    model.input_shape = (1, 3, 64, 64)
    return model


def hf_resnet() -> nn.Module:
    import transformers

    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])
    model = _half_gamma(transformers.ResNetForImageClassification(config))
    model.input_shape = (1, 3, 32, 32)
    return model


class PoseLike(nn.Module):
    """Ultralytics' Pose head writes decoded keypoints into strided channel
    slices of a clone, in place; export records aten.copy_ into views."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.kpt = nn.Conv2d(8, 6, 1)
        self.shape = None

    def forward(self, x, *args):
        y = self.kpt(torch.relu(self.bn(self.conv(x)))).flatten(2).clone()
        y[:, 2::3] = y[:, 2::3].sigmoid()
        y[:, 0::3] = y[:, 0::3] * 2.0
        if self.shape != x.shape:
            self.shape = x.shape
        return y


class TfPadding(nn.Module):
    """Hugging Face's TF-style padding: F.pad before unpadded convs, symmetric
    for stride 1 and asymmetric (ZeroPad2d) for stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, bias=False)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(F.pad(x, (1, 1, 1, 1)))))
        x = torch.relu(self.bn2(self.conv2(self.pad(x))))
        return self.conv3(F.pad(x, [1, 1, 1, 1], "constant", 0.0))
