"""The fast inference form (models/mixture_inference.py) computes what the per-base loop computes:
for every k (a single net too), every λ, both digits CNNs, batches below and above one chunk, one
image (plain conv) and several (prepacked oneDNN kernel), and padded static chunks."""

import pytest
import torch

from models.blocks import DualBatchNorm
from models.fuse import ChannelsLast
from models.mixture_inference import CHUNK, FastCNN, MixedHead, compile_inference, inference_model, max_pool2
from models.splitmix import SplitMixSpec, build_mixture, init_global_state


def _random_statistics_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct, non-trivial BN statistics and affine parameters on every path (a fresh model has
    mean 0, variance 1, weight 1, bias 0 everywhere, which would hide a wrong fold or λ)."""
    g = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)
    return model


def _state(spec: SplitMixSpec) -> dict[str, torch.Tensor]:
    """Global state whose bases have random BN statistics (set on the full stack, then split)."""
    state = init_global_state(spec, seed=0)
    full = _random_statistics_(build_mixture(spec, state, list(range(spec.num_bases))), seed=1)
    from models.splitmix import base_key, split_stacked_state

    return {base_key(i, n): t for i, b in enumerate(split_stacked_state(full.state_dict(), spec.num_bases)) for n, t in b.items()}


def _per_base_loop(spec: SplitMixSpec, state: dict[str, torch.Tensor], k: int, lam: float, x: torch.Tensor) -> torch.Tensor:
    """The reference: each base built alone (unfolded, λ set), the mean of their logits."""
    with torch.no_grad():
        return torch.stack([build_mixture(spec, state, [b], lam)(x) for b in range(k)]).mean(0)


@pytest.mark.parametrize("arch,image_size", [("cnn", 8), ("cnn", 28), ("digit-cnn", 8), ("digit-cnn", 28)])
def test_fast_form_equals_the_per_base_loop_for_every_width_and_lambda(arch, image_size):
    spec = SplitMixSpec(arch=arch, image_size=image_size, atom_width=0.25)
    state = _state(spec)
    chunk = 16  # a smaller chunk than CHUNK keeps the reference loop cheap; the code path is the same
    x = torch.rand(chunk + 7, 1, image_size, image_size)  # two chunks, the second a partial one
    for k in range(1, spec.num_bases + 1):
        outputs = {}
        for lam in (0.0, 0.3, 1.0):
            fast = inference_model(build_mixture(spec, state, list(range(k)), lam))
            assert isinstance(fast, FastCNN)  # a single net (k = 1) too
            assert not any(isinstance(m, (DualBatchNorm, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)) for m in fast.modules())
            fast.chunk = chunk
            with torch.no_grad():
                outputs[lam] = fast(x)
                one = fast(x[:1])  # one image takes aten's conv2d, not the prepacked kernel
            torch.testing.assert_close(outputs[lam], _per_base_loop(spec, state, k, lam, x), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(one, outputs[lam][:1], rtol=1e-4, atol=1e-5)
        # λ reaches the served logits (the clean and adversarial statistics differ).
        assert (outputs[0.0] - outputs[1.0]).abs().max() > 1e-2


def test_default_mixture_of_eight_bases_and_a_single_example():
    spec = SplitMixSpec()  # the default: 8 bases of the 8×8 digits CNN
    state = _state(spec)
    for x in (torch.rand(1, 1, 8, 8), torch.rand(CHUNK + 3, 1, 8, 8)):
        with torch.no_grad():
            fast = inference_model(build_mixture(spec, state, list(range(8)), 0.7))(x)
        torch.testing.assert_close(fast, _per_base_loop(spec, state, 8, 0.7, x), rtol=1e-4, atol=1e-5)


def test_fallback_convolution_off_the_fused_kernel_gives_the_same_logits(monkeypatch):
    """Off CPU (or without oneDNN) the convs run as conv2d + relu; both give the same function."""
    import models.mixture_inference as mi

    spec = SplitMixSpec(atom_width=0.25)
    state = _state(spec)
    x = torch.rand(5, 1, 8, 8)
    model = build_mixture(spec, state, [0, 1, 2], 0.3)
    with torch.no_grad():
        fused = inference_model(model)(x)
        monkeypatch.setattr(mi, "_FUSED_CONV", False)
        plain = inference_model(model)(x)
    torch.testing.assert_close(plain, fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, _per_base_loop(spec, state, 3, 0.3, x), rtol=1e-4, atol=1e-5)


def test_mixed_head_is_the_mean_of_the_bases_last_layers():
    # Hand case: k = 2 bases, 1 input, 1 output: base 0 computes 2h + 1, base 1 computes 4h + 3;
    # the mixture at h = (1, 10) is ((2·1 + 1) + (4·10 + 3)) / 2 = 23.
    from models.blocks import StackedLinear

    layer = StackedLinear(1, 1, num_bases=2)
    layer.weight.data = torch.tensor([[2.0], [4.0]])
    layer.bias.data = torch.tensor([1.0, 3.0])
    head = MixedHead(layer)
    assert head(torch.tensor([[[1.0]], [[10.0]]])).item() == pytest.approx(23.0)  # (k, B, h) = (2, 1, 1)


def test_max_pool2_matches_max_pool2d_and_keeps_channels_last():
    for channels in (5, 32):  # the two maxima; aten's kernel (a multiple of 16 channels)
        x = torch.randn(3, channels, 6, 4).contiguous(memory_format=torch.channels_last)
        pooled = max_pool2(x)
        assert torch.equal(pooled, torch.nn.functional.max_pool2d(x, 2))
        assert pooled.is_contiguous(memory_format=torch.channels_last)
    odd = torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)  # floor, as max_pool2d
    assert torch.equal(max_pool2(odd), torch.nn.functional.max_pool2d(odd, 2))


def test_static_chunks_pad_a_partial_chunk_to_a_power_of_two_and_drop_the_padding(monkeypatch):
    """What the compiled form runs (without compiling here): chunks of exactly ``chunk`` images, a
    partial one padded with zero images to a power of two (at least 8), the padding's logits cut."""
    spec = SplitMixSpec(atom_width=0.25)
    state = _state(spec)
    fast = inference_model(build_mixture(spec, state, [0, 1], 0.4))
    fast.chunk = 32
    seen: list[int] = []
    monkeypatch.setattr(fast, "layers", _Recording(fast.layers, seen))
    x = torch.rand(32 + 32 + 11, 1, 8, 8)
    with torch.no_grad():
        plain = fast(x)
        fast.static = True
        seen.clear()
        static = fast(x)
        assert seen == [32, 32, 16]  # 11 → the next power of two
        seen.clear()
        assert fast(x[:3]).shape == (3, 10) and seen == [8]  # 3 → at least 8
    torch.testing.assert_close(static, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, _per_base_loop(spec, state, 2, 0.4, x), rtol=1e-4, atol=1e-5)


class _Recording(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, seen: list[int]) -> None:
        super().__init__()
        self.inner, self.seen = inner, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return self.inner(x)


def test_other_families_keep_the_folded_form():
    from models.registry import create_model

    model = create_model("preresnet18", width=0.125, in_channels=3, image_size=32).eval()
    assert isinstance(inference_model(model), ChannelsLast)


@pytest.mark.slow
def test_compiled_fast_form_equals_the_eager_one(monkeypatch):
    """Models of several k and λ compiled side by side (each must keep its own weights) at a full
    chunk plus a padded one, one image and a padded 20: 18 programs in all, none of them falling
    back to eager (dynamo's limit is 8 programs per code object)."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    spec = SplitMixSpec(atom_width=0.25)
    state = _state(spec)
    for k in (1, 2, 3):
        for lam in (0.0, 1.0):
            eager = inference_model(build_mixture(spec, state, list(range(k)), lam))
            compiled = compile_inference(inference_model(build_mixture(spec, state, list(range(k)), lam)))
            for x in (torch.rand(CHUNK + 3, 1, 8, 8), torch.rand(1, 1, 8, 8), torch.rand(20, 1, 8, 8)):
                with torch.no_grad():
                    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(compiled(x), _per_base_loop(spec, state, k, lam, x), rtol=1e-4, atol=1e-5)


def test_served_form_copies_pickles_and_reloads_without_stale_packed_weights():
    """The oneDNN-packed conv weights are a cache of the module's state: a deep copy and a
    ``torch.save``/``load`` round trip serve the same logits, and ``load_state_dict`` with other
    weights serves those weights (not the ones packed when the form was built)."""
    import copy
    import io

    spec = SplitMixSpec()
    state = _state(spec)
    x = torch.rand(9, 1, 8, 8)  # more than one image: the packed kernel's path
    fast = inference_model(build_mixture(spec, state, list(range(4)), 0.2))
    with torch.no_grad():
        served = fast(x)
        torch.testing.assert_close(copy.deepcopy(fast)(x), served, rtol=0, atol=0)
        buffer = io.BytesIO()
        torch.save(fast, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), served, rtol=0, atol=0)
        other = inference_model(build_mixture(spec, init_global_state(spec, seed=5), list(range(4)), 0.2))
        expected = other(x)
        assert (expected - served).abs().max() > 1e-3  # the two weight sets serve different logits
        fast.load_state_dict(other.state_dict())
        torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # how the service builds and runs its models (no version counters)
        torch.testing.assert_close(inference_model(build_mixture(spec, state, list(range(4)), 0.2))(x), served, rtol=1e-5, atol=1e-6)
