"""The fast inference form of the digits CNNs (``cnn``, ``digit-cnn``), a single net or a Split-Mix
mixture of k bases: what ``splitmix serve`` runs for them.

A mixture of k bases at atom width r has the channels of the width-k·r net but only k·r² of its
weights, so next to a parameter-matched dense net it moves ~2.8× more activations through the
same number of MACs, in grouped convolutions with few channels per group. The stacked training
model (grouped convs, batched matmuls, BN and ReLU as separate passes) is slow to serve; this form
computes the same function with fewer passes over those activations and fewer per-call costs:

- every conv/linear → (dual, λ-mixed) batch norm pair is folded into one layer
  (:func:`models.fuse.affine`), and its ReLU runs inside the convolution kernel (oneDNN's fused
  post-op, ``mkldnn._convolution_pointwise``), whose weight is reordered into oneDNN's blocked
  layout once, when the form is built (``conv2d`` reorders it on every call; a cache remade when
  the weight changes, left out of copies and pickles); one image takes
  plain ``conv2d`` + ``relu`` (aten's path for a single image costs less than a oneDNN call), and
  so does everything off CPU;
- the first convolution reads the one input every base shares: one plain conv with k·c outputs;
- the k bases' hidden linear layers are one batched matmul that reads the channels-last maps
  in place (weights permuted to that order once) with the bias added in the same kernel;
- the k bases' last linear layers and the mean of their logits are one matmul:
  ``mean_i(W_i h_i + b_i) = [W_1 … W_k]/k · h + mean_i b_i``;
- 2×2 max-pooling is two element-wise maxima over channels-last views (no index tensor) when the
  channels are not a multiple of 16, otherwise aten's channels-last kernel (:func:`max_pool2`);
- a large batch runs in chunks of :data:`CHUNK` images.

A single net (k = 1, e.g. the dense baseline a mixture is compared with) gets the same form: the
rewrites are not specific to mixtures, and measured they serve it faster than the folded form.
Formulations tried and measured slower on the development CPU (so not used): the grouped convs as
im2col + one batched matmul, in oneDNN's blocked (``to_mkldnn``) layout, in NCHW, and through
aten's native (non-oneDNN) kernel; one reduction (``amax``) for the pooling, or maxima written in
place; chunks of 32–128.

:func:`compile_inference` compiles the layer chain for static chunk shapes (under compilation the
convolutions are plain ``conv2d`` + ``relu``, which inductor lowers itself); eager and compiled
measured about the same, so plain ``splitmix serve`` (no compile latency) is the default.

The result is exact up to float rounding (``tests/unit/test_mixture_inference.py`` compares it
with the per-base loop for every k and λ). It is for inference only; export keeps the portable
:func:`models.fuse.fuse_for_inference` form (no private operators in a ``.pt2`` program).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from models.blocks import StackedConv2d, StackedLinear, StackedNet
from models.cnn import DigitCNN
from models.digit_model import DigitModel
from models.fuse import affine, fuse_for_inference

CHUNK = 256  # images per pass: measured, smaller chunks (64, 128) were no faster at 1 thread and slower at 2

_FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class ConvReLU(nn.Module):
    """``relu(conv2d(x, weight, bias))`` with stride 1, as one oneDNN kernel on CPU with the weight
    reordered once into oneDNN's blocked layout (``conv2d`` reorders it on every call)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, padding: int, groups: int) -> None:
        super().__init__()
        self.weight = _frozen(weight.contiguous(memory_format=torch.channels_last))
        self.bias = _frozen(bias)
        self.padding, self.groups = padding, groups
        self._packed: torch.Tensor | None = None
        self._packed_of: tuple[int, int] | None = None  # (data_ptr, version) of the weight it was made from
        self.packed_weight()  # now, not in the first request

    def packed_weight(self) -> torch.Tensor | None:
        """``weight`` reordered into oneDNN's blocked layout, or None without the fused kernel.

        A cache, not state: remade whenever the weight changed (``load_state_dict`` copies into it
        in place, which bumps its version), so it is never stale; left out of copies and pickles
        (an opaque oneDNN tensor has no storage to copy) and remade on first use there."""
        if not _FUSED_CONV or self.weight.device.type != "cpu":
            return None
        # Inference tensors (built under torch.inference_mode, as the service builds its models)
        # keep no version counter; outside inference mode they cannot be changed in place at all.
        made_of = (self.weight.data_ptr(), -1 if self.weight.is_inference() else self.weight._version)
        if self._packed is None or self._packed_of != made_of:
            # The blocked layout oneDNN picks depends on the channels and the CPU, not on the batch or
            # image size (a weight packed for one input size gives the same result for any other).
            size = [CHUNK, self.weight.shape[1] * self.groups, 8, 8]
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(self.weight, [self.padding] * 2, [1, 1], [1, 1], self.groups, size)
            self._packed_of = made_of
        return self._packed

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_packed"], state["_packed_of"] = None, None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        # One image: aten's conv2d takes a cheaper path than a oneDNN primitive (measured faster).
        if x.shape[0] > 1 and x.device.type == "cpu" and not torch.compiler.is_compiling():
            packed = self.packed_weight()
            if packed is not None:
                return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, [p, p], [1, 1], [1, 1], self.groups, "relu", [], "")
        # Under torch.compile the plain form, which inductor lowers itself (its meta kernel of the
        # private op misreads a one-channel input's layout and the compiled program fails).
        return F.relu(F.conv2d(x, self.weight, self.bias, 1, p, 1, self.groups))

    def extra_repr(self) -> str:
        out, per_group, kh, kw = self.weight.shape
        return f"{per_group * self.groups}, {out}, kernel=({kh}, {kw}), padding={self.padding}, groups={self.groups}"


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` of a channels-last batch as two element-wise maxima (the NHWC memory
    seen as (B, H/2, 2, W/2, 2·C): row pairs, then the two channel halves of column pairs).

    aten's own channels-last kernel is one pass but vectorised over whole blocks of 16 channels:
    measured, it is the faster one when C is a multiple of 16 and the slower one otherwise (the
    maxima run over contiguous rows of W·C values, whatever C is)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2 or c % 16 == 0 or not x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, 2)
    v = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2 * c)
    rows = torch.maximum(v[:, :, 0], v[:, :, 1])
    return torch.maximum(rows[..., :c], rows[..., c:]).permute(0, 3, 1, 2)


class MaxPool2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2(x)


class AvgPoolTo(nn.Module):
    """Adaptive average pooling to ``size``×``size``, skipped when the map has that size already."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-2:] == (self.size, self.size) else F.adaptive_avg_pool2d(x, self.size)


class HiddenLinear(nn.Module):
    """The k bases' hidden linear layers (BN folded) and their ReLU as one batched matmul.

    Input: channels-last maps ``(B, k·c, s, s)`` (the NHWC memory read in place as each base's
    ``(position, channel)`` features; the weights are permuted to that order once, here) or the
    previous hidden layer's ``(k, B, f)``. Output ``(k, B, h)``.
    """

    def __init__(self, layer: StackedLinear, norm: nn.Module, channels: int) -> None:
        super().__init__()
        a, b = affine(norm)
        k, h, n = layer.num_bases, layer.out_per_base, layer.in_per_base
        weight = (layer.weight * a.view(-1, 1)).view(k, h, channels, n // channels)  # channel-major features
        self.weight = _frozen(weight.permute(0, 3, 2, 1).reshape(k, n, h))
        self.bias = _frozen((b if layer.bias is None else a * layer.bias + b).view(k, 1, h))
        self.num_bases, self.channels = k, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            batch, _, height, width = x.shape
            k, c = self.num_bases, self.channels
            x = x.permute(0, 2, 3, 1).reshape(batch, height * width, k, c).permute(2, 0, 1, 3).reshape(k, batch, -1)
        return torch.relu_(torch.baddbmm(self.bias, x, self.weight))


class MixedHead(nn.Module):
    """The k bases' last linear layers and the mean of their logits as one matmul (input
    ``(k, B, h)``)."""

    def __init__(self, layer: StackedLinear) -> None:
        super().__init__()
        k, o, h = layer.num_bases, layer.out_per_base, layer.in_per_base
        weight = layer.weight.view(k, o, h).permute(1, 0, 2).reshape(o, k * h) / k
        bias = layer.bias.view(k, o).mean(0) if layer.bias is not None else torch.zeros(o)
        self.weight, self.bias = _frozen(weight), _frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.permute(1, 0, 2).reshape(x.shape[1], -1), self.weight, self.bias)


class FastCNN(nn.Module):
    """A chain of the layers above on a channels-last batch, run in chunks of ``chunk`` images."""

    def __init__(self, layers: list[nn.Module], chunk: int = CHUNK) -> None:
        super().__init__()
        self.layers: nn.Module = nn.Sequential(*layers)
        self.chunk = chunk
        self.static = False  # compiled for fixed chunk sizes: a partial chunk is padded to a power of two
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.compiled or self.layers
        n = x.shape[0]
        if not self.static or n == self.chunk:
            return layers(x)
        size = min(self.chunk, max(8, 1 << (n - 1).bit_length()))
        padded = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)
        return layers(padded)[:n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if x.shape[0] <= self.chunk:
            return self._run(x)
        return torch.cat([self._run(part) for part in x.split(self.chunk)])

    def compile_layers(self) -> FastCNN:
        """``torch.compile`` the layer chain for static shapes: whole chunks, and partial chunks
        padded to a power of two of at least 8 images, so at most log2(chunk) − 2 programs per
        model. Measured, static shapes served both the mixture and the dense net faster than a
        dynamic batch (and a program per batch size would compile on every new request size);
        inductor's freezing (weights prepacked as constants) and ``max-autotune`` were no faster.
        Chunking stays in Python."""
        layers = self.layers

        def run(x: torch.Tensor) -> torch.Tensor:
            return layers(x)

        # Dynamo counts compiled programs per code object (``recompile_limit``, then it runs eagerly):
        # this model's programs get a code object of their own, not nn.Sequential.forward's, which
        # every served model shares (a run of 8 widths would need up to 48 programs).
        run.__code__ = run.__code__.replace()
        self.compiled = torch.compile(run, dynamic=False)
        self.static = True
        return self


def _conv(conv: StackedConv2d, norm: nn.Module, shared_input: bool = False) -> ConvReLU:
    a, b = affine(norm)
    weight = conv.weight * a.view(-1, 1, 1, 1)
    bias = b if conv.bias is None else a * conv.bias + b
    # The first conv reads the input all bases share: its stacked weight is one plain conv.
    return ConvReLU(weight, bias, cast(int, conv.padding[0]), 1 if shared_input else conv.groups)


def _digit_cnn(m: DigitCNN) -> list[nn.Module]:
    # forward_bases: relu(bn1(conv1)), pool(relu(bn2(conv2))), pool(relu(bn3(conv3))),
    # adaptive pool to 2×2, relu(bn4(fc1)), fc2; mean over bases.
    return [
        _conv(m.conv1, m.bn1, shared_input=True),
        _conv(m.conv2, m.bn2),
        MaxPool2(),
        _conv(m.conv3, m.bn3),
        MaxPool2(),
        AvgPoolTo(2),
        HiddenLinear(m.fc1, m.bn4, m.conv3.out_channels // m.num_bases),
        MixedHead(m.fc2),
    ]


def _digit_model(m: DigitModel) -> list[nn.Module]:
    # forward_bases: pool(relu(bn1(conv1))), pool(relu(bn2(conv2))), relu(bn3(conv3)), flatten,
    # relu(bn4(fc1)), relu(bn5(fc2)), fc3; mean over bases.
    return [
        _conv(m.conv1, m.bn1, shared_input=True),
        MaxPool2(),
        _conv(m.conv2, m.bn2),
        MaxPool2(),
        _conv(m.conv3, m.bn3),
        HiddenLinear(m.fc1, m.bn4, m.conv3.out_channels // m.num_bases),
        HiddenLinear(m.fc2, m.bn5, m.fc1.out_per_base),
        MixedHead(m.fc3),
    ]


_BUILDERS: dict[type, Callable[[StackedNet], list[nn.Module]]] = {
    DigitCNN: lambda m: _digit_cnn(cast(DigitCNN, m)),
    DigitModel: lambda m: _digit_model(cast(DigitModel, m)),
}


@torch.no_grad()
def inference_model(model: nn.Module) -> nn.Module:
    """The model as served: the fast form above for the digits CNNs (any k, any λ), otherwise the
    folded channels-last copy of :func:`models.fuse.fuse_for_inference`. ``model`` is an eval-mode
    network with batch-norm statistics; it is left untouched."""
    builder = _BUILDERS.get(type(model))
    if builder is None:
        return fuse_for_inference(model)
    return FastCNN(builder(cast(StackedNet, model))).eval()


def compile_inference(model: nn.Module) -> nn.Module:
    """``torch.compile`` a served model (what ``splitmix serve --compile`` serves)."""
    if isinstance(model, FastCNN):
        return model.compile_layers()
    return cast(nn.Module, torch.compile(model, dynamic=True))  # an OptimizedModule; the stub says Callable
