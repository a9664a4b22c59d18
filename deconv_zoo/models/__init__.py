"""Importing this package registers every deconv-zoo model with timm."""
from .cifar_resnet import *
