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

# One or more models of 39 timm modules (sub-families); TIMM_MORE (run last) adds
# more members of the largest ones.
TIMM = """
resnet18 resnet50 ecaresnet26t seresnext26d_32x4d resnext26ts resnest14d skresnet18
legacy_seresnet18 regnetx_002 regnety_008 regnetz_b16 efficientnet_b0 tf_efficientnet_b0
efficientnetv2_rw_t mobilenetv2_100 mnasnet_100 fbnetc_100 mixnet_s mobilenetv3_large_100
tf_mobilenetv3_small_100 mobilenetv4_conv_small lcnet_050 hardcorenas_a ghostnet_050
ghostnetv2_100 repghostnet_050 densenet121 dla34 dla46_c dpn68 cspresnet50 cspdarknet53
darknet53 cs3darknet_s vovnet39a ese_vovnet19b_dw repvgg_a0 mobileone_s0 fastvit_t8 rexnet_100
gernet_s selecsls42b vgg11_bn resnetv2_50 hgnetv2_b0 hgnet_tiny mobilevit_xxs mobilevitv2_050
levit_128s efficientformer_l1 res2net50_26w_4s res2next50 hrnet_w18_small inception_v3
inception_v4 inception_resnet_v2 xception41 legacy_xception efficientvit_b0 efficientvit_m0
convmixer_768_32 tresnet_m repvit_m0_9 resnest26d nasnetalarge pnasnet5large
""".split()
TIMM_MORE = """
resnet26d resnet10t regnety_002 eca_resnet33ts efficientnet_lite0 tinynet_a tinynet_e
mobilenetv1_100 mobilenetv2_050 mobilenetv3_small_050 mnasnet_small semnasnet_050 spnasnet_100
""".split()
# timm input sides: 64 px unless the architecture needs more (fixed attention
# resolutions, or stems and valid-padded pools that need ≥ 75 px)
TIMM_SIZES = {"levit_128s": 224, "efficientformer_l1": 224, "mobilevit_xxs": 224,
              "efficientvit_m0": 224, "mobilevitv2_050": 128, "inception_v3": 128,
              "inception_v4": 128, "inception_resnet_v2": 128, "xception41": 96,
              "legacy_xception": 96, "nasnetalarge": 128, "pnasnet5large": 128}  # fmt: skip
ULTRALYTICS = ["yolov8n", "yolov8s", "yolov8n-seg", "yolov8s-seg", "yolov8n-cls", "yolov8s-cls",
               "yolov8n-pose", "yolov8s-pose", "yolo11n"]  # fmt: skip
TRANSFORMERS = ["ResNet", "MobileNetV1", "MobileNetV2", "RegNet", "EfficientNet", "MobileViT",
                "ConvNext", "Levit", "SwiftFormer"]  # fmt: skip
# Every torchvision classification model with BatchNorm but one (TORCHVISION_EXCLUDED).
TORCHVISION = """
resnet18 resnet34 resnet50 resnet101 resnet152 resnext50_32x4d resnext101_32x8d
resnext101_64x4d wide_resnet50_2 wide_resnet101_2 mobilenet_v2 mobilenet_v3_small
mobilenet_v3_large efficientnet_b0 efficientnet_b1 efficientnet_b2 efficientnet_b3
efficientnet_b4 efficientnet_b5 efficientnet_b6 efficientnet_b7 efficientnet_v2_s
efficientnet_v2_m efficientnet_v2_l regnet_x_400mf regnet_x_800mf regnet_x_1_6gf regnet_x_3_2gf
regnet_x_8gf regnet_x_16gf regnet_x_32gf regnet_y_400mf regnet_y_800mf regnet_y_1_6gf
regnet_y_3_2gf regnet_y_8gf regnet_y_16gf regnet_y_32gf mnasnet0_5 mnasnet0_75 mnasnet1_0
mnasnet1_3 shufflenet_v2_x0_5 shufflenet_v2_x1_0 shufflenet_v2_x1_5 shufflenet_v2_x2_0
densenet121 densenet161 densenet169 densenet201 googlenet inception_v3 vgg11_bn vgg13_bn
vgg16_bn vgg19_bn maxvit_t
""".split()
TORCHVISION_EXCLUDED = {
    "regnet_y_128gf": "644 M parameters (2.6 GB): the row's several copies do not fit next to "
    "the other jobs of this 23 GB machine",
}
# No BatchNorm, so no γ to zero and nothing for either tool to remove.
TORCHVISION_WITHOUT_BN = """
alexnet convnext_tiny convnext_small convnext_base convnext_large squeezenet1_0 squeezenet1_1
swin_t swin_s swin_b swin_v2_t swin_v2_s swin_v2_b vgg11 vgg13 vgg16 vgg19 vit_b_16 vit_b_32
vit_l_16 vit_l_32 vit_h_14
""".split()
# torchvision input sides: 64 px (fully convolutional up to the adaptive pool)
# unless the architecture needs more
TORCHVISION_SIZES = {"inception_v3": 128, "maxvit_t": 224}
FAMILIES = {
    "torchvision": TORCHVISION,
    "timm": TIMM + TIMM_MORE,
    "ultralytics": ULTRALYTICS,
    "transformers": TRANSFORMERS,
}


def build(family: str, name: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """(model in eval mode, input shape, sub-family) for one entry of FAMILIES."""
    if family == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = TIMM_SIZES.get(name, 64)
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
    import torchvision

    from fxprune import zoo

    size = TORCHVISION_SIZES.get(name, 64)
    module = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    return zoo.create_model(name).eval(), (1, 3, size, size), module


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
