"""The ``torch`` backend: featurekit's own heads on torch, CPU or CUDA. Always importable (torch
is a dependency); loaded only through the registry.

* :mod:`._common`: the estimator shell every torch head shares, standardisation, tensors;
* :mod:`._kernels`: the one RBF kernel (and Nystroem's normalisation);
* :mod:`._lbfgs`: a batched L-BFGS;
* :mod:`._linear`: logistic, linearsvc and nystroem on it;
* :mod:`._svm`: the exact RBF SVM (libsvm's problem, batched SMO);
* :mod:`._knn`: the k-NN vote (DINO's protocol), similarities in blocks within a budget.
"""

# importing them registers the heads; the names here are also where head files written by
# featurekit 0.1 find the linear heads' classes (featurekit.heads._torch.TorchLogisticHead, ...)
from featurekit.heads._torch._linear import (  # noqa: F401
    TorchLinearSVCHead,
    TorchLogisticHead,
    TorchNystroemHead,
)
from featurekit.heads._torch._svm import TorchSVMHead  # noqa: F401
from featurekit.heads._torch._knn import TorchKNNHead  # noqa: F401
