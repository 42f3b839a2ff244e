"""Caffe's solvers as ``torch.optim`` optimizers with Caffe-exact float32 math, and its lr policies.

Driver use, per Caffe iteration ``i``::

    rate, current_step = learning_rate(policy, base_lr, i, ..., current_step=current_step)
    # after backward (iter_size times): clip_gradients_(params, clip); scale_gradients_(params, 1/iter_size)
    opt.set_lr(rate)
    opt.step()                      # uses opt.iteration == i, then increments it

``OPTIMIZERS`` maps SolverParameter ``type`` names to classes.
"""
from .adadelta import AdaDelta
from .adagrad import AdaGrad
from .adam import Adam
from .base import CaffeOptimizer, TensorListOps, clip_gradients_, f32, scale_gradients_
from .lr_policy import LR_POLICIES, learning_rate
from .nesterov import Nesterov
from .rmsprop import RMSProp
from .sgd import SGD

OPTIMIZERS: dict[str, type[CaffeOptimizer]] = {
    "SGD": SGD, "Nesterov": Nesterov, "AdaGrad": AdaGrad,
    "RMSProp": RMSProp, "AdaDelta": AdaDelta, "Adam": Adam,
}

__all__ = [
    "AdaDelta", "AdaGrad", "Adam", "CaffeOptimizer", "LR_POLICIES", "Nesterov", "OPTIMIZERS",
    "RMSProp", "SGD", "TensorListOps", "clip_gradients_", "f32", "learning_rate",
    "scale_gradients_",
]
