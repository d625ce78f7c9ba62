"""The models of the coverage table (benchmarks/coverage.py), by family.

Every model is built from its library's own configuration, offline: timm
with `pretrained=False`, Ultralytics from its yaml, transformers from a
default `*Config()`, torchvision through fxprune's zoo (weights=None).
"""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")

TIMM = """
resnet18 resnet50 resnet26d resnet10t resnext26ts ecaresnet26t resnest14d skresnet18
seresnext26d_32x4d legacy_seresnet18 regnetx_002 regnety_002 regnety_008 regnetz_b16
efficientnet_b0 efficientnet_lite0 tf_efficientnet_b0 efficientnetv2_rw_t tinynet_a tinynet_e
mobilenetv1_100 mobilenetv2_050 mobilenetv2_100 mobilenetv3_small_050 mobilenetv3_large_100
tf_mobilenetv3_small_100 mobilenetv4_conv_small mnasnet_small mnasnet_100 semnasnet_050
fbnetc_100 spnasnet_100 mixnet_s hardcorenas_a lcnet_050 ghostnet_050 ghostnetv2_100
repghostnet_050 densenet121 dla34 dla46_c dpn68 cspresnet50 cspdarknet53 darknet53 cs3darknet_s
vovnet39a ese_vovnet19b_dw repvgg_a0 mobileone_s0 fastvit_t8 rexnet_100 gernet_s eca_resnet33ts
selecsls42b vgg11_bn resnetv2_50 hgnetv2_b0 hgnet_tiny mobilevit_xxs levit_128s
efficientformer_l1
""".split()
ULTRALYTICS = ["yolov8n", "yolov8s", "yolov8n-seg", "yolov8s-seg", "yolov8n-cls", "yolov8s-cls",
               "yolov8n-pose", "yolov8s-pose", "yolo11n"]  # fmt: skip
TRANSFORMERS = ["ResNet", "MobileNetV1", "MobileNetV2", "RegNet", "EfficientNet", "MobileViT",
                "ConvNext", "Levit", "SwiftFormer"]  # fmt: skip
TORCHVISION = """
resnet18 mobilenet_v2 mobilenet_v3_small efficientnet_b0 regnet_x_400mf mnasnet0_5
shufflenet_v2_x0_5 googlenet
""".split()
FAMILIES = {
    "torchvision": TORCHVISION,
    "timm": TIMM,
    "ultralytics": ULTRALYTICS,
    "transformers": TRANSFORMERS,
}


def build(family: str, name: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """(model in eval mode, input shape, sub-family) for one entry of FAMILIES."""
    if family == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = 224 if name in ("levit_128s", "efficientformer_l1", "mobilevit_xxs") else 64
        shape = (1, 3, size, size)
        arch = timm.models.get_arch_name(name)
        module = timm.models._registry._model_to_module.get(arch, arch)
        return model.eval(), shape, module
    if family == "ultralytics":
        from ultralytics.nn import tasks

        task = name.split("-")[1] if "-" in name else "detect"
        cls = {"seg": tasks.SegmentationModel, "cls": tasks.ClassificationModel,
               "pose": tasks.PoseModel}.get(task, tasks.DetectionModel)  # fmt: skip
        model = cls(f"{name}.yaml", verbose=False)
        return model.eval(), (1, 3, 128, 128), task
    if family == "transformers":
        import transformers

        stem = name.removesuffix("ForImageClassification")
        # EfficientNetConfig() is B7 (66 M parameters): B0's coefficients keep the row short
        kwargs = {"EfficientNet": {"width_coefficient": 1.0, "depth_coefficient": 1.0,
                                   "hidden_dim": 1280}}  # fmt: skip
        config = getattr(transformers, f"{stem}Config")(**kwargs.get(stem, {}))
        model = getattr(transformers, f"{stem}ForImageClassification")(config)
        size = 224 if stem == "Levit" else 128  # Levit's attention biases fix the size
        return model.eval(), (1, 3, size, size), stem
    from fxprune import zoo

    info = zoo.model_info(name)
    return zoo.create_model(name).eval(), tuple(info.input_shape), info.kind


def zero_half_gamma(model: nn.Module, seed: int = 0) -> int:
    """Set a random half of the γ of every BatchNorm exactly to 0; returns how many."""
    gen = torch.Generator().manual_seed(seed)
    zeroed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and weight is not None:
            width = weight.shape[0]
            idx = torch.randperm(width, generator=gen)[: width // 2]
            with torch.no_grad():
                weight[idx] = 0.0
            zeroed += len(idx)
    return zeroed
