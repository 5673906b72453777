"""cuML heads (NVIDIA GPUs): the same three heads on cuML's estimators.

Imported only through the registry; ``import cuml`` failing (no NVIDIA stack) means this
backend is simply not registered. Written against cuML's documented API:
``cuml.preprocessing.StandardScaler``, ``cuml.linear_model.LogisticRegression(C, max_iter,
tol)``, ``cuml.svm.LinearSVC(C, max_iter, tol)``, ``cuml.svm.SVC(C, kernel, gamma, tol,
cache_size)``; numpy in, numpy out (cuML's default ``output_type="input"``).
"""

from __future__ import annotations

import cuml  # noqa: F401  (ImportError here = backend unavailable)
import numpy as np
from cuml.linear_model import LogisticRegression
from cuml.preprocessing import StandardScaler
from cuml.svm import SVC, LinearSVC

from featurekit.heads import register
from featurekit.heads._base import Head


class _CumlHead(Head):
    backend = "cuml"

    def _scaler(self) -> StandardScaler:
        return StandardScaler()

    def fit(self, X, y):
        # cuML computes in float32 on the GPU
        return super().fit(np.asarray(X, dtype=np.float32), y)


@register("logistic", "cuml")
class CumlLogisticHead(_CumlHead):
    """cuML logistic regression (quasi-Newton, multinomial for more than two classes)."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def _wrapped_estimator(self) -> LogisticRegression:
        return LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol)

    def predict_proba(self, X):
        X = self._checked(X)
        return np.asarray(self.pipeline_.predict_proba(X))


@register("linearsvc", "cuml")
class CumlLinearSVCHead(_CumlHead):
    """cuML linear SVM (one-vs-rest)."""

    def __init__(self, C: float = 1.0, max_iter: int = 5000, tol: float = 1e-4) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def _wrapped_estimator(self) -> LinearSVC:
        return LinearSVC(C=self.C, max_iter=self.max_iter, tol=self.tol)


@register("svm", "cuml")
class CumlSVMHead(_CumlHead):
    """cuML RBF SVC."""

    def __init__(self, C: float = 1.0, gamma: float | str = "scale", tol: float = 1e-3,
                 cache_size: float = 1024.0) -> None:
        self.C = C
        self.gamma = gamma
        self.tol = tol
        self.cache_size = cache_size

    def _wrapped_estimator(self) -> SVC:
        return SVC(C=self.C, kernel="rbf", gamma=self.gamma, tol=self.tol, cache_size=self.cache_size)
