"""The decoder's matrix-product path equals the transposed-convolution modules it keeps as parameters."""
import torch
from torch import nn

from meddinov3_nnunet.models.decoder import TokenAggregationDecoder


def reference(decoder: TokenAggregationDecoder, features: torch.Tensor) -> torch.Tensor:
    """ConvTranspose2d -> LayerNorm2d -> GELU per stage, then the 1x1 Conv2d: the modules' own forwards."""
    return decoder.head(nn.Sequential(*[nn.Sequential(*stage) for stage in decoder.stages])(features))


def test_gemm_decoder_matches_transposed_convolutions():
    torch.manual_seed(0)
    decoder = TokenAggregationDecoder(in_channels=4 * 96, num_classes=5)
    for parameter in decoder.parameters():  # non-trivial biases and norm affine terms too
        nn.init.normal_(parameter, std=0.1)
    features = torch.randn(3, 4 * 96, 2, 5)
    with torch.no_grad():
        out, expected = decoder(features), reference(decoder, features)
    assert out.shape == (3, 5, 32, 80) and out.is_contiguous()
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4)
    # channels-last memory as input (what the network hands over) gives the same result
    with torch.no_grad():
        assert torch.allclose(decoder(features.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)


def test_gemm_decoder_gradients_match():
    torch.manual_seed(1)
    decoder = TokenAggregationDecoder(in_channels=64, num_classes=3)
    features = torch.randn(2, 64, 3, 2, requires_grad=True)
    decoder(features).square().sum().backward()
    ours = [features.grad.clone()] + [p.grad.clone() for p in decoder.parameters()]
    features.grad = None
    decoder.zero_grad()
    reference(decoder, features).square().sum().backward()
    theirs = [features.grad] + [p.grad for p in decoder.parameters()]
    for a, b in zip(ours, theirs):  # float32 summation order differs: relative to the gradient's scale
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
