"""Networks: the ResNet-9 architecture, k-copy modules equal k plain models, init, FLOPs."""
import pytest
import torch
from torch import nn

from workers.models import MLP, ResNet9, build_model, forward_flops, init_weights, stack_states, unstack_states


def test_resnet9_parameter_count_and_shape():
    m = ResNet9()
    assert sum(p.numel() for p in m.parameters()) == 2_274_880
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (3, 64, 3, 1, 1), (64, 128, 5, 2, 2), (128, 128, 3, 1, 1), (128, 128, 3, 1, 1),
        (128, 256, 3, 1, 1), (256, 256, 3, 1, 1), (256, 256, 3, 1, 1), (256, 128, 3, 1, 0)]
    assert all(c.bias is None for c in convs)
    assert m.linear.bias is None and tuple(m.linear.weight.shape) == (10, 128)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet9_output_is_scaled_linear_of_pooled_features():
    m = ResNet9(width=0.25).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expect = 0.2 * m.body(x) @ m.linear.weight.T
        assert torch.allclose(m(x), expect, atol=1e-6)


def test_forward_flops_matches_published_figure():
    assert forward_flops(ResNet9(), (3, 32, 32)) == pytest.approx(0.583e9, rel=2e-3)
    assert forward_flops(MLP(784, (64,)), (1, 28, 28)) == 2 * (784 * 64 + 64 * 10)
    # per-copy FLOPs do not depend on the number of copies
    shape = (3, 16, 16)
    assert forward_flops(ResNet9(width=0.25, copies=3), shape) == forward_flops(ResNet9(width=0.25), shape)


@pytest.mark.parametrize("cfg,shape", [({"name": "resnet9", "width": 0.125}, (3, 16, 16)),
                                       ({"name": "mlp", "hidden": [16, 8]}, (1, 8, 8))])
@pytest.mark.parametrize("train_mode", [True, False])
def test_k_copy_module_equals_k_plain_models(cfg, shape, train_mode):
    k, b = 3, 5
    plain = [init_weights(build_model(cfg, shape, 10), torch.Generator().manual_seed(j)) for j in range(k)]
    stacked = build_model(cfg, shape, 10, copies=k)
    stacked.load_state_dict(stack_states([p.state_dict() for p in plain]))
    for mod in [*plain, stacked]:
        mod.train(train_mode)
    x = torch.randn(k, b, *shape)
    out = stacked(x)
    assert out.shape == (k, b, 10)
    for j in range(k):
        assert torch.allclose(out[j], plain[j](x[j]), atol=1e-5)
    # in train mode BatchNorm running stats are tracked per copy, exactly like the plain models
    back = unstack_states(stacked.state_dict(), k)
    for j in range(k):
        for key, v in plain[j].state_dict().items():
            assert torch.allclose(back[j][key].float(), v.float(), atol=1e-6), key


def test_copies_get_independent_gradients():
    stacked = build_model({"name": "resnet9", "width": 0.125}, (3, 16, 16), 10, copies=2)
    out = stacked(torch.randn(2, 4, 3, 16, 16))
    out[0].sum().backward()
    w = stacked.body[0][0].weight.grad  # [2*8, 3, 3, 3]
    assert w[:8].abs().sum() > 0 and w[8:].abs().sum() == 0
    assert stacked.linear.weight.grad[10:].abs().sum() == 0


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_gradients_equal_k_plain_linears(bias):
    """The grouped layer's own backward (weight gradient written in the weight's layout) gives
    each copy the gradients of a plain nn.Linear on its slice."""
    from workers.models import GroupedLinear
    k, b, i, o = 3, 7, 11, 5
    layer = GroupedLinear(i, o, groups=k, bias=bias)
    x = torch.randn(k, b, i, requires_grad=True)
    g = torch.randn(k, b, o)
    layer(x).backward(g)
    assert layer.weight.grad.shape == (k * o, i) and layer.weight.grad.is_contiguous()
    for j in range(k):
        plain = torch.nn.Linear(i, o, bias=bias)
        with torch.no_grad():
            plain.weight.copy_(layer.weight[j * o:(j + 1) * o])
            if bias:
                plain.bias.copy_(layer.bias[j * o:(j + 1) * o])
        xj = x[j].detach().clone().requires_grad_(True)
        plain(xj).backward(g[j])
        assert torch.allclose(layer.weight.grad[j * o:(j + 1) * o], plain.weight.grad, atol=1e-5)
        assert torch.allclose(x.grad[j], xj.grad, atol=1e-5)
        if bias:
            assert torch.allclose(layer.bias.grad[j * o:(j + 1) * o], plain.bias.grad, atol=1e-5)


def test_init_is_a_function_of_the_generator():
    a = init_weights(MLP(20), torch.Generator().manual_seed(1)).state_dict()
    b = init_weights(MLP(20), torch.Generator().manual_seed(1)).state_dict()
    c = init_weights(MLP(20), torch.Generator().manual_seed(2)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.weight"], c["layers.0.weight"])
    bound = 1 / 20 ** 0.5  # kaiming-uniform(a=sqrt 5) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a["layers.0.weight"].abs().max() <= bound


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="model.name"):
        build_model({"name": "vgg"}, (3, 32, 32), 10)
