import pytest
import torch
import torch.nn as nn

from models.ibm import ImplicitBoundaryMining


def test_output_shapes_and_channels_last():
    torch.manual_seed(0)
    module = ImplicitBoundaryMining(64).eval()
    x = torch.randn(2, 64, 9, 7)
    out, boundary, embedding = module(x)
    assert out.shape == x.shape
    assert boundary.shape == (2, 1, 9, 7)
    assert embedding.shape == (2, 8, 9, 7)
    assert (boundary < 0).any()  # raw scores, not a sigmoid

    with torch.no_grad():
        out_cl, boundary_cl, embedding_cl = module(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out_cl, out, atol=1e-5)
    assert torch.allclose(boundary_cl, boundary, atol=1e-5)
    assert torch.allclose(embedding_cl, embedding, atol=1e-5)


def test_layer_structure():
    module = ImplicitBoundaryMining(64, reduction=16, embedding_dim=5)
    linears = [m for m in module.channel_mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 4), (4, 64)]
    assert module.fuse.in_channels == 192 and module.spatial.kernel_size == (7, 7)
    assert [module.branch_1x1.kernel_size, module.branch_3x3.kernel_size, module.branch_5x5.kernel_size] == [
        (1, 1), (3, 3), (5, 5)]
    assert module.boundary_head[0].out_channels == 32
    assert module(torch.randn(1, 64, 4, 4))[2].shape[1] == 5


def test_identity_output_conv_at_init_keeps_the_residual_input():
    torch.manual_seed(0)
    module = ImplicitBoundaryMining(16)
    with torch.no_grad():
        module.fuse.weight.zero_()
        module.fuse.bias.zero_()
        x = torch.randn(1, 16, 6, 6)
        out, _, _ = module(x)
    # With the attended term silenced, out is exactly the input (step 5's residual, identity conv).
    assert torch.allclose(out, x, atol=1e-6)


def test_every_parameter_gets_a_finite_nonzero_gradient():
    torch.manual_seed(0)
    module = ImplicitBoundaryMining(64)
    x = torch.randn(2, 64, 8, 8)
    out, boundary, embedding = module(x)
    loss = out.square().mean() + 0.01 * boundary.square().mean() + 0.01 * embedding.norm(dim=1).mean()
    loss.backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert any(name.startswith("channel_mlp") for name, _ in module.named_parameters())


def test_rejects_too_few_channels():
    with pytest.raises(ValueError, match="channels"):
        ImplicitBoundaryMining(1)
