"""Importing this package registers every deconv-zoo model with timm."""
from .cifar_resnet import *
from .cifar_vgg import *
from .cifar_densenet import *
from .cifar_resnext import *
from .deconv_resnet import *
from .deconv_vgg import *
from .deconv_densenet import *
