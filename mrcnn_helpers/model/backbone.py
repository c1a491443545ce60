"""ResNet 10/18/34/50/101 + FPN backbone with TLT's freeze_blocks / freeze_bn semantics.

Module names follow torchvision (`body.conv1`, `body.layer1`, `fpn.inner_blocks.0.0`, ...), so its
ImageNet ResNets and COCO Mask R-CNN weights load by name.

TLT block numbering: 0 = the stem (conv1 + bn1), 1..4 = layer1..layer4. A frozen block keeps its
weights and, when BN is trainable, also its BN statistics (its BN layers stay in eval mode).
freeze_bn replaces every BatchNorm with FrozenBatchNorm2d (fixed affine transform); that is the
right choice for fine-tuning at small per-GPU batches, and the wrong one from random weights.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from . import fused_conv, fused_stage, kernels, stem
from .bias_ops import bias_act, bias_relu_maxpool, conv_without_bias, top_down_add
from .fused_conv import compute_dtype

RESNET_LAYOUTS = {
    10: (BasicBlock, [1, 1, 1, 1]),
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}
FPN_CHANNELS = 256
# Levels of the FPN that come from ResNet stages: level l is layer(l - 1), stride 2**l.
STAGE_LEVELS = (2, 3, 4, 5)


def frozen_bn_scale_shift(bn: TorchvisionFrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) of a frozen BN: it computes x * scale + shift."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bn.bias - bn.running_mean * scale


class FrozenBatchNorm2d(TorchvisionFrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers and names), computed in the input's dtype.

    torchvision's version multiplies by fp32 statistics, so under bf16/fp16 autocast every
    normalized activation becomes fp32 and the next convolution converts it back: about five
    bytes of memory traffic per activation byte, on the largest tensors of the network. Here the
    affine transform is one fused multiply-add in the activation's own precision.
    """

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = frozen_bn_scale_shift(self)
        shape = (1, -1, 1, 1)
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose transform the preceding convolution applies (see fold_frozen_bn);
    it keeps its buffers, so weights load and save under torchvision's names, and passes through."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class ConvWithFrozenBN(nn.Conv2d):
    """conv -> frozen BN computed as one convolution: weights scaled per output channel, the
    BN shift as its bias. Gradients still reach the (trainable) convolution weights through the
    scaling; the BN statistics stay fixed. Removes a full read and write of every activation."""

    def folded(self) -> tuple[Tensor, Tensor]:
        """(weight, bias) of the single convolution."""
        scale, shift = frozen_bn_scale_shift(self.folded_bn[0])
        return self.weight * scale.view(-1, 1, 1, 1), shift

    def forward(self, x: Tensor) -> Tensor:
        if stem.applies(self, x):
            out, bias = self.unbiased(x)
            return out + bias.view(1, -1, 1, 1)
        weight, bias = self._weights(x)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The folded (weight, bias): through autograd where the weights train, else the cached
        ones, in the dtype the convolution runs in."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            dtype = compute_dtype(x, self.weight)
            scale, shift = self._scale_shift(dtype)
            return (self.weight * scale).to(dtype), shift
        return self._inference_weights(x)

    def _bn_key(self, dtype: torch.dtype) -> tuple:
        """What the folded constants depend on: the dtype and the BN tensors' storage and
        version (an in-place change, e.g. load_state_dict, bumps the version)."""
        bn = self.folded_bn[0]
        return (dtype,) + tuple((t.data_ptr(), t._version) for t in (
            bn.weight, bn.bias, bn.running_mean, bn.running_var))

    def _scale_shift(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(scale [K, 1, 1, 1] in fp32, shift in dtype) of the frozen BN, computed once and kept
        while the BN tensors stay the same: in training each step otherwise spends five small
        kernels per convolution on these constants (scale, shift) and one on the bias cast."""
        key = self._bn_key(dtype)
        cache = self.__dict__.get("_scale_shift_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                scale, shift = frozen_bn_scale_shift(self.folded_bn[0])
            cache = (key, scale.view(-1, 1, 1, 1), shift.to(dtype))
            self.__dict__["_scale_shift_cache"] = cache
        return cache[1], cache[2]

    def _inference_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The folded weights, computed once and kept (in autocast's dtype) while neither they nor
        the BN statistics change: at batch 1 the five small kernels per convolution otherwise cost
        as much launch time as the convolution itself."""
        dtype = compute_dtype(x, self.weight)
        key = self._bn_key(dtype) + ((self.weight.data_ptr(), self.weight._version),)
        cache = self.__dict__.get("_inference_cache")
        if cache is None or cache[0] != key:
            scale, shift = self._scale_shift(dtype)
            with torch.no_grad():
                weight = (self.weight * scale).to(dtype)
            cache = self.__dict__["_inference_cache"] = (key, weight, shift)
        return cache[1], cache[2]

    def _space_to_depth_weight(self, weight: Tensor) -> Tensor:
        """stem.space_to_depth_weight(weight), kept while `weight` is the same unchanged tensor
        without gradient (the cached weights of a frozen stem or of inference)."""
        if weight.requires_grad:
            return stem.space_to_depth_weight(weight)
        # The cache holds `weight` itself: compared by identity, its storage cannot be reused.
        cache = self.__dict__.get("_space_to_depth_cache")
        if cache is None or cache[0] is not weight or cache[1] != weight._version:
            cache = self.__dict__["_space_to_depth_cache"] = (
                weight, weight._version, stem.space_to_depth_weight(weight))
        return cache[2]

    def unbiased(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conv(x) without its bias, the bias): a shortcut convolution whose bias the block's
        last convolution adds in its own fused kernel."""
        weight, bias = self._weights(x)
        if stem.applies(self, x):  # the 7 x 7 stem on 2 x 2 blocks (stem.py)
            blocks = stem.space_to_depth_blocks(x.to(weight.dtype))
            return F.conv2d(blocks, self._space_to_depth_weight(weight)), bias
        out = F.conv2d(x.to(weight.dtype), weight, None, self.stride, self.padding, self.dilation,
                       self.groups)
        return out, bias

    def fused(self, x: Tensor, residual: Tensor | None = None,
              extra_bias: Tensor | None = None) -> Tensor:
        """relu(conv(x) + bias [+ extra_bias] [+ residual]), one cuDNN kernel where cuDNN has a
        fused engine for this convolution, with autograd (fused_conv.conv_bias_relu), in
        training as at inference; else the unfused composition."""
        weight, bias = self._weights(x)
        if extra_bias is not None:
            bias = bias + extra_bias
        return fused_conv.conv_bias_relu_where_possible(
            self, x.to(weight.dtype), weight, bias, residual,
            (self.stride, self.padding, self.dilation, self.groups))


def _use_fused(x: Tensor, block: nn.Module) -> bool:
    """Whether `block` runs its convolutions as fused conv + bias + ReLU (+ add) kernels."""
    return fused_conv.enabled_for(x)


def _shortcut(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """The block's identity branch, and the bias its last convolution should add for it (the
    downsample convolution's folded BN shift, added in that fused kernel instead of a pass of
    its own)."""
    if block.downsample is None:
        return x, None
    if type(block.downsample[0]) is ConvWithFrozenBN:
        return block.downsample[0].unbiased(x)
    return block.downsample(x), None


def stage_is_folded(stage: nn.Module) -> bool:
    """Whether every convolution of a ResNet stage applies its frozen BN (fold_frozen_bn)."""
    return all(type(conv) is ConvWithFrozenBN for block in stage
               for conv in fused_stage.block_convs(block))


class FoldedBottleneck(Bottleneck):
    """torchvision's Bottleneck whose convolutions apply their frozen BN (fold_frozen_bn); on CUDA
    each conv + bias + ReLU, and the last one's residual add, is one kernel, in training too."""

    def forward(self, x: Tensor) -> Tensor:
        if not _use_fused(x, self):
            return super().forward(x)
        out = self.conv2.fused(self.conv1.fused(x))
        identity, bias = _shortcut(self, x)
        return self.conv3.fused(out, residual=identity, extra_bias=bias)


class FoldedBasicBlock(BasicBlock):
    """BasicBlock counterpart of FoldedBottleneck."""

    def forward(self, x: Tensor) -> Tensor:
        if not _use_fused(x, self):
            return super().forward(x)
        identity, bias = _shortcut(self, x)
        return self.conv2.fused(self.conv1.fused(x), residual=identity, extra_bias=bias)


def fold_frozen_bn(resnet: ResNet) -> None:
    """Make every convolution that feeds a FrozenBatchNorm2d apply it (in place).

    The pairs are torchvision's: stem conv1/bn1, each block's convK/bnK and downsample.0/.1.
    Module classes change, module names and state_dict keys do not.
    """
    pairs = [(resnet, "conv1", resnet, "bn1")]
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in layer:
            for k in (1, 2, 3):
                if hasattr(block, f"conv{k}"):
                    pairs.append((block, f"conv{k}", block, f"bn{k}"))
            if block.downsample is not None:
                pairs.append((block.downsample, "0", block.downsample, "1"))
    for conv_parent, conv_name, bn_parent, bn_name in pairs:
        conv, bn = getattr(conv_parent, conv_name), getattr(bn_parent, bn_name)
        if (not isinstance(bn, TorchvisionFrozenBatchNorm2d) or type(conv) is not nn.Conv2d
                or conv.bias is not None):
            continue
        conv.__class__ = ConvWithFrozenBN
        # A plain list, not a submodule: the BN stays registered (and saved) where it is.
        conv.folded_bn = [bn]
        bn.__class__ = FoldedFrozenBatchNorm2d
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in layer:
            convs = [getattr(block, f"conv{k}") for k in (1, 2, 3) if hasattr(block, f"conv{k}")]
            if all(type(c) is ConvWithFrozenBN for c in convs):
                block.__class__ = {Bottleneck: FoldedBottleneck, BasicBlock: FoldedBasicBlock}[
                    type(block)]


class FPN(FeaturePyramidNetwork):
    """torchvision's FeaturePyramidNetwork (same modules and names) whose convolutions' biases,
    and the top-down merge (lateral + nearest-upsampled coarser level), are single passes on
    CUDA (bias_ops). Elsewhere it is torchvision's forward itself."""

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names, maps = list(x.keys()), list(x.values())
        if not kernels.available(maps[0]):
            return super().forward(x)
        inner = [block[0] for block in self.inner_blocks]
        layer = [block[0] for block in self.layer_blocks]
        last_inner = bias_act(conv_without_bias(inner[-1], maps[-1]), inner[-1].bias)
        results = [bias_act(conv_without_bias(layer[-1], last_inner), layer[-1].bias)]
        for idx in range(len(maps) - 2, -1, -1):
            last_inner = top_down_add(conv_without_bias(inner[idx], maps[idx]), inner[idx].bias,
                                      last_inner)
            results.insert(0, bias_act(conv_without_bias(layer[idx], last_inner),
                                       layer[idx].bias))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, maps, names)
        return OrderedDict(zip(names, results, strict=True))


class ResNetFPN(nn.Module):
    """images (normalized float Tensor[B, 3, H, W]) -> list of FPN maps for min_level..max_level.

    Level l has stride 2**l and FPN_CHANNELS channels; the level above 5 (P6) is a stride-2
    max-pool of P5, used by the RPN only.
    """

    def __init__(self, nlayers: int, min_level: int, max_level: int, freeze_bn: bool,
                 freeze_blocks: tuple[int, ...]):
        super().__init__()
        block, layers = RESNET_LAYOUTS[nlayers]
        norm = FrozenBatchNorm2d if freeze_bn else nn.BatchNorm2d
        resnet = ResNet(block, layers, norm_layer=norm)
        if freeze_bn:
            fold_frozen_bn(resnet)
        stage_levels = [lvl for lvl in STAGE_LEVELS if min_level <= lvl <= max_level]
        # Keep only what the FPN reads: the stem and the stages up to the deepest used level.
        keep = ["conv1", "bn1", "relu", "maxpool"] + [f"layer{lvl - 1}" for lvl in STAGE_LEVELS
                                                      if lvl <= stage_levels[-1]]
        self.body = nn.ModuleDict(OrderedDict((name, getattr(resnet, name)) for name in keep))
        expansion = block.expansion
        in_channels = [64 * 2 ** (lvl - 2) * expansion for lvl in stage_levels]
        extra = LastLevelMaxPool() if max_level > stage_levels[-1] else None
        self.fpn = FPN(in_channels, FPN_CHANNELS, extra_blocks=extra)
        self.stage_levels = stage_levels
        self.num_levels = max_level - min_level + 1
        self.frozen_modules = self._freeze(freeze_blocks)
        self.out_channels = FPN_CHANNELS

    def _freeze(self, freeze_blocks: tuple[int, ...]) -> list[nn.Module]:
        names = {0: ["conv1", "bn1"], 1: ["layer1"], 2: ["layer2"], 3: ["layer3"], 4: ["layer4"]}
        frozen = []
        for block in freeze_blocks:
            for name in names[block]:
                if name in self.body:
                    module = self.body[name]
                    module.requires_grad_(False)
                    frozen.append(module)
        return frozen

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen blocks must not update BN running statistics either.
        for module in self.frozen_modules:
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        x = images
        stages = OrderedDict()
        # The folded stem's bias and ReLU in one pass (cuDNN has no fused engine for 3 channels),
        # and the max pool with them where nothing needs their gradient (bias_ops).
        fused_stem = type(self.body["conv1"]) is ConvWithFrozenBN and kernels.available(x)
        for name, module in self.body.items():
            if fused_stem and name == "conv1":
                x = bias_relu_maxpool(*module.unbiased(x), self.body["maxpool"])
                continue
            if fused_stem and name in ("relu", "maxpool"):
                continue
            if (name.startswith("layer") and fused_stage.applies(module, x)
                    and stage_is_folded(module)):
                x = fused_stage.stage_forward(module, x)  # opt-in (fused_stage.py)
            else:
                x = module(x)
            if name.startswith("layer"):
                level = int(name[-1]) + 1
                if level in self.stage_levels:
                    stages[str(level)] = x
        features = self.fpn(stages)
        return list(features.values())[: self.num_levels]


def backbone_from_spec(cfg) -> ResNetFPN:
    """Build the backbone from a MaskRCNNConfig."""
    return ResNetFPN(cfg.nlayers, cfg.min_level, cfg.max_level, cfg.freeze_bn,
                     tuple(cfg.freeze_blocks))

