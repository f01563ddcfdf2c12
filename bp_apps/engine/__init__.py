"""The hand-written backprop engine: explicit forward/backward pairs, no autograd."""

from bp_apps.engine.attention import MultiHeadAttention
from bp_apps.engine.conv import AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv1d, Conv2d, Flatten, MaxPool2d
from bp_apps.engine.crf import CRF
from bp_apps.engine.ctc import CTCLoss, LogSoftmax
from bp_apps.engine.embedding import Embedding
from bp_apps.engine.layers import (
    GELU,
    BatchNorm1d,
    Dropout,
    Layer,
    LayerNorm,
    LeakyReLU,
    Linear,
    ReLU,
    Sigmoid,
    Tanh,
)
from bp_apps.engine.losses import BCEWithLogitsLoss, MSELoss, SoftmaxCrossEntropy
from bp_apps.engine.models import ACTIVATIONS, MLP, NonFiniteError, Sequential, make_activation
from bp_apps.engine.optim import SGD, Adam, AdamW, Optimizer, build_optimizer, clip_grad_norm, cosine_lr
from bp_apps.engine.privacy import GroupNorm, PerExampleRecorder, privatize
from bp_apps.engine.recurrent import GRU, LSTM
from bp_apps.engine.sequence import Concat, MaskedMax, PositionGather, RowGather
from bp_apps.engine.train import train_step
from bp_apps.engine.transformer import EngineBart

__all__ = [
    "ACTIVATIONS", "CRF", "GELU", "GRU", "LSTM", "MLP", "SGD", "Adam", "AdamW", "AdaptiveAvgPool2d", "AvgPool2d",
    "BCEWithLogitsLoss", "BatchNorm1d", "BatchNorm2d", "CTCLoss", "Concat", "Conv1d", "Conv2d", "Dropout", "Embedding",
    "EngineBart", "Flatten", "GroupNorm", "Layer", "LayerNorm", "LeakyReLU", "Linear", "LogSoftmax", "MSELoss",
    "MaskedMax", "MaxPool2d", "MultiHeadAttention", "NonFiniteError", "Optimizer", "PerExampleRecorder",
    "PositionGather", "ReLU", "RowGather", "Sequential", "Sigmoid", "SoftmaxCrossEntropy", "Tanh", "build_optimizer",
    "clip_grad_norm", "cosine_lr", "make_activation", "privatize", "train_step"
]
