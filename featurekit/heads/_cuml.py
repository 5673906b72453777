"""cuML heads (NVIDIA GPUs): the same three heads on cuML's estimators.

Imported only through the registry; ``import cuml`` failing (no NVIDIA stack) means this
backend is simply not registered. Each cuML head takes the parameters of its scikit-learn twin
and swaps the scaler and the classifier. Written against cuML's documented API:
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
from featurekit.heads._sklearn import LinearSVCHead, LogisticHead, SVMHead


class _CumlHead:
    """Mixin placed before a scikit-learn head: cuML scaler, float32 input."""

    backend = "cuml"

    def _scaler(self) -> StandardScaler:
        return StandardScaler()

    def fit(self, X, y):
        return super().fit(np.asarray(X, dtype=np.float32), y)  # cuML computes in float32


@register("logistic", "cuml")
class CumlLogisticHead(_CumlHead, LogisticHead):
    """cuML logistic regression (quasi-Newton; multinomial for more than two classes)."""

    def _wrapped_estimator(self) -> LogisticRegression:
        return LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol)


@register("linearsvc", "cuml")
class CumlLinearSVCHead(_CumlHead, LinearSVCHead):
    """cuML linear SVM (one-vs-rest); ``random_state`` is unused (cuML's solver is exact)."""

    def _wrapped_estimator(self) -> LinearSVC:
        return LinearSVC(C=self.C, max_iter=self.max_iter, tol=self.tol)


@register("svm", "cuml")
class CumlSVMHead(_CumlHead, SVMHead):
    """cuML RBF SVC."""

    def _wrapped_estimator(self) -> SVC:
        return SVC(C=self.C, kernel="rbf", gamma=self.gamma, tol=self.tol, cache_size=self.cache_size)
