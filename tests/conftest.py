"""Test session set-up: offline hub, private caches, and the zoo registered with timm."""
import os
import tempfile

import pytest

# Nothing may reach the network; caches live in a throw-away folder (timm and torch.hub
# otherwise write under ~/.cache).
_CACHE_ROOT = tempfile.mkdtemp(prefix='deconv_zoo_tests_')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ.setdefault('HF_HOME', os.path.join(_CACHE_ROOT, 'hf'))
os.environ.setdefault('TORCH_HOME', os.path.join(_CACHE_ROOT, 'torch'))
os.environ.pop('DECONV_ZOO_HUB_ORG', None)
# Scripts run in subprocesses import this checkout, installed or not.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (_REPO, os.environ.get('PYTHONPATH')) if p)

import deconv_zoo  # noqa: E402  (registers the models with timm)


@pytest.fixture
def seeded():
    import torch
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)
