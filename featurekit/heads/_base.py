"""The shared shape of every head: validate, standardise, classify."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class Head(ClassifierMixin, BaseEstimator, metaclass=ABCMeta):
    """A scikit-learn classifier on cached features that standardises its input inside.

    Subclasses store their parameters in ``__init__``; validation happens in ``fit`` (the
    estimator contract), which hands the validated arrays to ``_fit``.
    """

    backend = "sklearn"

    def _prepare(self, X):
        """Validated input -> what the backend computes on (e.g. float32 for cuML)."""
        return X

    def _expected_failed_checks(self) -> dict[str, str]:
        """scikit-learn conformance checks this head may fail, with the reason for each."""
        return {}

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self._fit(self._prepare(X), y)
        return self

    @abstractmethod
    def _fit(self, X, y) -> None:
        """Fit on validated arrays; sets ``classes_`` and the fitted state."""

    def _checked(self, X):
        check_is_fitted(self)
        return self._prepare(validate_data(self, X, reset=False, dtype=[np.float64, np.float32]))


class PipelineHead(Head):
    """A head that is a scikit-learn Pipeline: the backend's scaler, then its classifier."""

    @abstractmethod
    def _wrapped_estimator(self, X=None) -> Any:
        """A new, unfitted classifier built from this head's parameters (``X``, when given, is
        the validated training data, for parameters resolved from it)."""

    @abstractmethod
    def _scaler(self) -> Any:
        """A new, unfitted standardiser of the backend."""

    def _expected_failed_checks(self) -> dict[str, str]:
        """By default exactly those scikit-learn itself declares for the wrapped estimator."""
        from sklearn.utils._test_common.instance_generator import _get_expected_failed_checks

        wrapped = self._wrapped_estimator()
        if isinstance(wrapped, Pipeline):
            wrapped = wrapped[-1]
        return dict(_get_expected_failed_checks(wrapped))

    def _fit(self, X, y) -> None:
        self.pipeline_ = Pipeline([("scale", self._scaler()), ("clf", self._wrapped_estimator(X))]).fit(X, y)
        self.classes_ = np.asarray(self.pipeline_.classes_)
        clf = self.pipeline_[-1]
        clf = clf[-1] if isinstance(clf, Pipeline) else clf
        if hasattr(clf, "n_iter_"):  # solver iterations, as scikit-learn's estimators expose them
            self.n_iter_ = clf.n_iter_

    def predict(self, X):
        X = self._checked(X)
        return np.asarray(self.pipeline_.predict(X))

    def decision_function(self, X):
        X = self._checked(X)
        return np.asarray(self.pipeline_.decision_function(X))


def gamma_value(gamma, n_features: int, variance=None) -> float:
    """The one meaning of an RBF head's ``gamma`` (scikit-learn's, on standardised features),
    shared by every backend: a number is itself; ``"auto"`` is 1 / n_features; ``"scale"`` is
    1 / (n_features * X.var()), ``variance()`` giving X.var() as the backend computes it (1.0
    for constant data; heads without a ``variance`` take no "scale"). Nystroem's ``None`` is
    ``"auto"`` (the head says so before asking)."""
    if isinstance(gamma, str) and gamma == "auto":
        return 1.0 / n_features
    if isinstance(gamma, str) and gamma == "scale" and variance is not None:
        var = float(variance())
        return 1.0 / (n_features * var) if var > 0 else 1.0
    if isinstance(gamma, (int, float, np.number)) and not isinstance(gamma, bool):
        return float(gamma)
    valid = "'scale', 'auto' or a number" if variance is not None else "'auto' or a number"
    raise ValueError(f"gamma must be {valid}, got {gamma!r}")


def check_knn(k, T) -> None:
    """The k-NN heads' parameters, every backend alike: k an integer >= 1, T a number > 0."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(T, bool) or not isinstance(T, (int, float, np.number)) or not T > 0:
        raise ValueError(f"T must be a number > 0, got {T!r}")
