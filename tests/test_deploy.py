"""Deployment: every deconvolution folded into plain layers; export with torch.export and ONNX."""
import warnings

import onnx
import onnxruntime
import pytest
import timm
import torch
import torch.nn as nn

from deconv_zoo.deploy import ChannelLinear, fold_deconv
from deconv_zoo.layers import ChannelDeconv, Delinear, FastDeconv
from weight_helpers import SMALL, assert_close, randomize_statistics

DECONV_LAYERS = (FastDeconv, Delinear, ChannelDeconv)


class Flatten2d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def every_layer_kind() -> nn.Module:
    """FastDeconv with interleaved channel blocks, stride 2, 1x1, groups, depthwise; ChannelDeconv
    with leftover channels, on 4-D and 2-D input; Delinear with several blocks."""
    return nn.Sequential(
        FastDeconv(6, 16, 3, padding=1, block=3), nn.ReLU(),  # 2 interleaved blocks of 3 channels
        FastDeconv(16, 16, 3, stride=2, padding=1, groups=4), nn.ReLU(),
        FastDeconv(16, 16, 3, padding=1, groups=16),
        FastDeconv(16, 24, 1, block=8),
        ChannelDeconv(10),  # 20 whitened channels (pairs of adjacent ones) + 4 standardised
        Flatten2d(),
        ChannelDeconv(5),
        Delinear(24, 7, block=8),
    )


MODELS = [every_layer_kind, lambda: timm.create_model('resnet18_cifar_deconv', **SMALL),
          lambda: timm.create_model('resnet18_cifar_deconv', delinear=False, **SMALL)]  # ChannelDeconv head


@pytest.mark.parametrize('model_fn', MODELS)
def test_folded_model_computes_the_same(model_fn):
    generator = torch.Generator().manual_seed(0)
    model = model_fn().eval()
    randomize_statistics(model, generator)
    image = torch.randn(2, 6 if isinstance(model, nn.Sequential) else 3, 32, 32, generator=generator)
    folded = fold_deconv(model, example_input=image if isinstance(model, nn.Sequential) else None)
    assert not any(isinstance(m, DECONV_LAYERS) for m in folded.modules())
    assert any(isinstance(m, ChannelLinear) for m in folded.modules()) == (model_fn is not MODELS[1])
    assert any(isinstance(m, DECONV_LAYERS) for m in model.modules())  # the original is left as it was
    with torch.no_grad():
        assert_close(folded(image), model(image), rel=1e-5)


def test_channel_deconv_is_sized_in_the_model_dtype():
    """Without example_input the ChannelDeconv sizing runs zeros of the model's own dtype."""
    model = timm.create_model('resnet18_cifar_deconv', delinear=False, **SMALL).eval().double()
    randomize_statistics(model, torch.Generator().manual_seed(0))
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(fold_deconv(model)(image), model(image), rel=1e-12)


def test_non_finite_statistics_are_refused_before_any_layer_is_replaced():
    model = every_layer_kind()
    image = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model[6].running_deconv[0, 0] = float('nan')
    with pytest.raises(FloatingPointError, match='fold_deconv: 6 folds to non-finite weights'):
        fold_deconv(model, inplace=True, example_input=image)
    assert sum(isinstance(m, DECONV_LAYERS) for m in model.modules()) == 7  # the inplace model is whole


def test_unused_non_finite_whitening_folds():
    """A ChannelDeconv whose block exceeds its channels only standardises: the reference left NaN in
    its unused whitening buffers, which the fold must not refuse."""
    model = nn.Sequential(FastDeconv(3, 4, 3, padding=1), ChannelDeconv(8)).eval()
    with torch.no_grad():
        model[1].running_mean1.fill_(float('nan'))
        model[1].running_deconv.fill_(float('nan'))
        model[1].running_var.fill_(2.0)
    image = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(fold_deconv(model, example_input=image)(image), model(image), rel=1e-6)


@pytest.fixture(scope='module', params=[True, False], ids=['delinear', 'channel_deconv'])
def deployed(request):
    generator = torch.Generator().manual_seed(1)
    model = timm.create_model('resnet18_cifar_deconv', delinear=request.param, **SMALL).eval()
    randomize_statistics(model, generator)
    image = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        return fold_deconv(model), image, model(image)


def test_torch_export(deployed):
    folded, image, expected = deployed
    exported = torch.export.export(folded, (image,))
    assert_close(exported.module()(image).detach(), expected, rel=1e-5)


def test_onnx_export_runs_in_onnxruntime(deployed, tmp_path):
    folded, image, expected = deployed
    path = tmp_path / 'model.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # the TorchScript-based exporter works here
        torch.onnx.export(folded, (image,), str(path), opset_version=17, dynamo=False, input_names=['image'],
                          output_names=['logits'], dynamic_axes={'image': {0: 'batch'}})
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    # ChannelLinear (the folded ChannelDeconv) is a MatMul between Transposes.
    assert {n.op_type for n in graph.graph.node} <= {'Conv', 'Relu', 'Add', 'GlobalAveragePool', 'Flatten', 'Gemm',
                                                   'Transpose', 'MatMul'}
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (logits,) = session.run(None, {'image': image.numpy()})
    assert_close(torch.from_numpy(logits), expected, rel=1e-5)
    (single,) = session.run(None, {'image': image[:1].numpy()})  # dynamic batch
    assert_close(torch.from_numpy(single), expected[:1], rel=1e-5)


def test_a_tied_layer_is_folded_under_every_name():
    """A FastDeconv stored under two names was folded under the first only: the other kept whitening
    each training batch, and the tie was broken."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = FastDeconv(8, 8, 3, padding=1, block=4)
            self.b = self.a

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model, x = Tied(), torch.randn(8, 8, 6, 6)
    model(x)
    folded = fold_deconv(model)
    assert type(folded.a) is nn.Conv2d and folded.a is folded.b
    with torch.no_grad():
        assert_close(folded(x), model.eval()(x), rel=1e-5)
