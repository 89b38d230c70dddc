"""The layer-handler registry: built-in per-channel parameters are sliced, and a user can teach the engine a
custom module. Every check compares the pruned net with its parent with the pruned channels zeroed (float64)."""

import pytest
import torch
import torch.nn as nn
from engine_utils import INPUT, zero_pruned_inputs

import kpid_zoo
from kpid_zoo.engine.groups import ROLE_CHANNEL, ROLE_IN, ROLE_PARAM, discover_groups
from kpid_zoo.engine.handlers import LayerHandler, per_channel
from kpid_zoo.engine.surgery import prune_model


def _assert_exact(model, keep):
    model = model.double().eval()
    graph = discover_groups(model, INPUT)
    x = torch.randn(3, *INPUT, dtype=torch.float64)
    pruned = prune_model(model, graph, keep)
    with torch.no_grad():
        expected, got = zero_pruned_inputs(model, graph, keep)(x), pruned(x)
    assert expected.abs().max() > 1e-3
    # a few hundred float64 multiply-adds per output: rounding stays near 1e-15, far below 1e-10
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    return graph, pruned


class _Net(nn.Module):
    def __init__(self, middle: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.middle, self.b = nn.Conv2d(3, 8, 3), middle, nn.Conv2d(8, 5, 1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x):
        return self.b(self.middle(self.a(x)) * self.gamma).mean((2, 3))


def test_prelu_with_one_slope_per_channel_is_sliced_and_a_shared_slope_is_kept():
    prelu = nn.PReLU(8)
    prelu.weight.data = torch.linspace(-1, 1, 8)
    graph, pruned = _assert_exact(_Net(prelu), {'a': torch.tensor([1, 2, 6])})
    assert {('middle', ROLE_CHANNEL), ('gamma', ROLE_PARAM), ('b', ROLE_IN)} <= {
        (m.module, m.role) for m in graph['a'].members
    }
    assert pruned.middle.weight.shape == (3,) and pruned.middle.num_parameters == 3
    assert pruned.gamma.shape == (3, 1, 1)
    _, pruned = _assert_exact(_Net(nn.PReLU(1)), {'a': torch.tensor([0, 7])})
    assert pruned.middle.weight.shape == (1,)


def test_a_parameter_that_is_not_per_channel_fixes_its_channels():
    net = _Net(nn.Identity())
    net.gamma = nn.Parameter(torch.rand(8, 30, 1))  # varies along a spatial axis too: nothing to slice it by
    graph = discover_groups(net, INPUT)
    assert not graph['a'].prunable and 'gamma of shape (8, 30, 1) meets 8 channels' in graph['a'].reason


class Shift(nn.Module):
    """A custom layer: adds a learned offset per channel, in a way fx cannot trace (data-dependent branch)."""

    def __init__(self, channels):
        super().__init__()
        self.offset = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        if x.sum() > 0:  # untraceable on its own: a handler makes it a leaf
            return x + self.offset.view(1, -1, 1, 1)
        return x - self.offset.view(1, -1, 1, 1)


class ShiftHandler(LayerHandler):
    def propagate(self, ctx, name, module, x):
        ctx.member(x, name, 'channel')  # its offsets are the input's channels, which it passes through
        return x

    def tensors(self, module, role):
        return [('offset', 0)]


def test_a_registered_custom_module_is_traced_sliced_and_scored():
    net = _Net(Shift(8))
    with pytest.raises(ValueError, match='cannot trace'):
        discover_groups(net, INPUT)
    kpid_zoo.register_layer_handler(Shift, ShiftHandler())
    try:
        graph, pruned = _assert_exact(net, {'a': torch.tensor([0, 3, 4, 5])})
        assert ('middle', 'channel') in {(m.module, m.role) for m in graph['a'].members}
        assert pruned.middle.offset.shape == (4,)
        handler = ShiftHandler()
        ((t, fn),) = handler.importance_tensors(net.middle, 'channel')
        assert t is net.middle.offset and torch.equal(fn(t.abs()), per_channel(0)(t.abs()))
    finally:
        from kpid_zoo.engine.handlers import _REGISTRY

        _REGISTRY.pop(Shift)


def test_register_layer_handler_as_a_decorator_and_bad_arguments():
    class Mine(nn.Module):
        def forward(self, x):
            return x

    from kpid_zoo.engine.handlers import _REGISTRY, ChannelwiseHandler, handler_for

    @kpid_zoo.register_layer_handler(Mine)
    class MineHandler(ChannelwiseHandler):
        pass

    try:
        assert isinstance(handler_for(Mine()), MineHandler)
        assert isinstance(handler_for(type('Sub', (Mine,), {})()), MineHandler)  # subclasses inherit it
    finally:
        _REGISTRY.pop(Mine)
    with pytest.raises(TypeError, match='expected an nn.Module subclass'):
        kpid_zoo.register_layer_handler(int, ChannelwiseHandler())
    with pytest.raises(TypeError, match='expected a LayerHandler'):
        kpid_zoo.register_layer_handler(Mine, object())
