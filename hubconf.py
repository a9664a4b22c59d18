"""torch.hub entry points: one per deconv-zoo model, generated from timm's registry.

    torch.hub.load('<owner>/deconv-zoo:main', 'resnet18_deconv', pretrained=True, trust_repo=True)
    torch.hub.load('/path/to/deconv-zoo', 'resnet18_cifar_deconv', source='local')
"""
import timm as _timm

import deconv_zoo as _deconv_zoo

dependencies = ['torch', 'timm', 'safetensors']


def _entrypoint(name: str):
    def create(pretrained: bool = False, **kwargs):
        return _timm.create_model(name, pretrained=pretrained, **kwargs)
    create.__name__ = create.__qualname__ = name
    create.__doc__ = (f"{name}: {_timm.models.model_entrypoint(name).__doc__}\n\n"
                      f"Same as timm.create_model('{name}', pretrained=..., **kwargs) after `import deconv_zoo`.")
    return create


globals().update({_name: _entrypoint(_name) for _name in _deconv_zoo.list_models()})
