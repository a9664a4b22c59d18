"""Importing this package registers every deconv-zoo model with timm."""
from .cifar_resnet import *
from .cifar_vgg import *
from .cifar_densenet import *
from .cifar_resnext import *
from .cifar_mobilenetv2 import *
from .cifar_dpn import *
from .cifar_pnasnet import *
from .cifar_efficientnet import *
from .deconv_resnet import *
from .deconv_vgg import *
from .deconv_densenet import *
