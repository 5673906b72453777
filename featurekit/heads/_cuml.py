"""cuML heads (NVIDIA GPUs): the scikit-learn heads' parameters on cuML's estimators.

Imported only through the registry. The backend registers when ``import cuml`` works and a
CUDA device is usable (cuML's own test: ``cupy.cuda.runtime.getDeviceCount() > 0``); on a
machine without a usable driver either can fail with errors other than ImportError, and the
registry treats any of them as "not available here".

Where cuML differs from scikit-learn, the heads make it behave like scikit-learn (read
against cuML 26.x's source; cuML cannot be installed on the development machines):

* outputs are pinned to numpy (``output_type="numpy"`` on every estimator, and
  ``cuml.using_output_type("numpy")`` around every call), so a user's global cuML setting
  changes nothing;
* input is validated by the head first, then cast to float32 (cuML computes in float32), in
  ``fit`` and in ``predict``/``decision_function`` alike;
* ``gamma="scale"`` is computed once, on all of the standardised X, as scikit-learn does (cuML's
  multiclass SVC computes it per one-vs-one pair on that pair's rows) and passed as a number;
* LinearSVC penalises the intercept as liblinear does (``penalized_intercept=True``; cuML's
  default leaves it unpenalised).

A fitted cuML head holds GPU objects: it is saved as ``.joblib`` only (skops cannot hold it),
and loading it needs cuML and a GPU.
"""

from __future__ import annotations

import cuml
import cupy
import numpy as np
from cuml.linear_model import LogisticRegression
from cuml.preprocessing import StandardScaler
from cuml.svm import SVC, LinearSVC

from featurekit.heads import register
from featurekit.heads._base import gamma_value
from featurekit.heads._sklearn import LinearSVCHead, LogisticHead, SVMHead

if cupy.cuda.runtime.getDeviceCount() < 1:
    raise ImportError("cuML imports, but no CUDA device is usable")

# scikit-learn conformance checks a cuML head is expected to fail, and why. featurekit's own
# list: the head validates its input itself, so cuML's own expected failures about lists, NaN
# or object dtype do not apply. Not yet confirmed on a GPU (no machine with cuML so far).
EXPECTED_FAILED_CHECKS = {
    "check_methods_subset_invariance":
        "float32 GPU kernels: scores of a subset differ from the full batch in the last bits",
    "check_methods_sample_order_invariance":
        "float32 GPU kernels: scores of permuted rows differ in the last bits",
    "check_fit_idempotent":
        "GPU reductions are not bitwise deterministic: a refit differs in the last bits",
    "check_decision_proba_consistency":
        "float32: probabilities and decision values can rank near-ties differently",
}


class _CumlHead:
    """Mixin placed before a scikit-learn head: cuML scaler and classifier, numpy outputs,
    float32 after validation."""

    backend = "cuml"

    def _scaler(self) -> StandardScaler:
        return StandardScaler()

    def _prepare(self, X):
        return np.asarray(X, dtype=np.float32)  # cuML computes in float32

    def fit(self, X, y):
        with cuml.using_output_type("numpy"):
            return super().fit(X, y)

    def predict(self, X):
        with cuml.using_output_type("numpy"):
            return super().predict(X)

    def decision_function(self, X):
        with cuml.using_output_type("numpy"):
            return super().decision_function(X)

    def _expected_failed_checks(self) -> dict[str, str]:
        return dict(EXPECTED_FAILED_CHECKS)


@register("logistic", "cuml")
class CumlLogisticHead(_CumlHead, LogisticHead):
    """cuML logistic regression (quasi-Newton; multinomial for more than two classes)."""

    def _wrapped_estimator(self, X=None) -> LogisticRegression:
        return LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, output_type="numpy")

    def predict_proba(self, X):
        with cuml.using_output_type("numpy"):
            return super().predict_proba(X)


@register("linearsvc", "cuml")
class CumlLinearSVCHead(_CumlHead, LinearSVCHead):
    """cuML linear SVM (one-vs-rest), intercept penalised as in liblinear; ``random_state`` is
    unused (cuML's solver is deterministic)."""

    def _wrapped_estimator(self, X=None) -> LinearSVC:
        return LinearSVC(C=self.C, max_iter=self.max_iter, tol=self.tol, penalized_intercept=True,
                         output_type="numpy")


@register("svm", "cuml")
class CumlSVMHead(_CumlHead, SVMHead):
    """cuML RBF SVC; ``gamma`` resolved to a number on all of X (see the module docstring)."""

    def _wrapped_estimator(self, X=None) -> SVC:
        gamma = self.gamma if X is None else gamma_value(self.gamma, X.shape[1],
                                                         lambda: _standardised_variance(X))
        return SVC(C=self.C, kernel="rbf", gamma=gamma, tol=self.tol, cache_size=self.cache_size,
                   output_type="numpy")


def _standardised_variance(X) -> float:
    """X.var() of the standardised ``X``, as scikit-learn's SVC sees it: each standardised
    column has mean 0 and variance var_/scale_**2 (1, or 0 when constant)."""
    from sklearn.preprocessing import StandardScaler as HostScaler

    s = HostScaler().fit(X)
    return float(np.mean(s.var_ / s.scale_**2))
