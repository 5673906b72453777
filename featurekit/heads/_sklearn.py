"""scikit-learn heads: standardise, then logistic regression, LinearSVC, RBF SVC, or a Nystroem
RBF approximation followed by logistic regression; and the k-NN vote (on L2-normalised rows,
not standardised: DINO's protocol)."""

from __future__ import annotations

import numpy as np
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from featurekit.heads import register
from featurekit.heads._base import Head, PipelineHead, check_knn


class _SklearnHead(PipelineHead):
    backend = "sklearn"

    def _scaler(self) -> StandardScaler:
        return StandardScaler()


@register("logistic", "sklearn")
class LogisticHead(_SklearnHead):
    """Multinomial logistic regression (L-BFGS) on standardised features."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def _wrapped_estimator(self, X=None) -> LogisticRegression:
        return LogisticRegression(C=self.C, solver="lbfgs", max_iter=self.max_iter, tol=self.tol)

    def predict_proba(self, X):
        X = self._checked(X)
        return np.asarray(self.pipeline_.predict_proba(X))


@register("linearsvc", "sklearn")
class LinearSVCHead(_SklearnHead):
    """Linear SVM (one-vs-rest, squared hinge) on standardised features."""

    def __init__(self, C: float = 1.0, max_iter: int = 5000, tol: float = 1e-4, random_state: int = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def _wrapped_estimator(self, X=None) -> LinearSVC:
        return LinearSVC(C=self.C, max_iter=self.max_iter, tol=self.tol, random_state=self.random_state)


@register("svm", "sklearn")
class SVMHead(_SklearnHead):
    """RBF-kernel SVC on standardised features (``gamma='scale'`` is 1/n_features there)."""

    def __init__(self, C: float = 1.0, gamma: float | str = "scale", tol: float = 1e-3,
                 cache_size: float = 500.0) -> None:
        self.C = C
        self.gamma = gamma
        self.tol = tol
        self.cache_size = cache_size

    def _wrapped_estimator(self, X=None) -> SVC:
        return SVC(C=self.C, kernel="rbf", gamma=self.gamma, tol=self.tol, cache_size=self.cache_size)


@register("nystroem", "sklearn")
class NystroemHead(_SklearnHead):
    """RBF kernel approximation (Nystroem: ``n_components`` landmarks drawn from the training
    rows by ``random_state``), then multinomial logistic regression, on standardised
    features: the RBF head for caches too large for an exact SVM. ``gamma=None`` is
    1 / n_features."""

    def __init__(self, C: float = 1.0, gamma: float | None = None, n_components: int = 2048,
                 max_iter: int = 1000, tol: float = 1e-4, random_state: int = 0) -> None:
        self.C = C
        self.gamma = gamma
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def _wrapped_estimator(self, X=None) -> Pipeline:
        m = self.n_components if X is None else min(self.n_components, X.shape[0])
        return Pipeline([
            ("nystroem", Nystroem(kernel="rbf", gamma=self.gamma, n_components=m,
                                  random_state=self.random_state)),
            ("logistic", LogisticRegression(C=self.C, solver="lbfgs", max_iter=self.max_iter,
                                            tol=self.tol)),
        ])

    def predict_proba(self, X):
        X = self._checked(X)
        return np.asarray(self.pipeline_.predict_proba(X))


class DinoWeights:
    """A neighbour's vote weight from its cosine distance d = 1 - cos: exp(-d / T), which is
    DINO's exp(cos / T) times exp(-1 / T), the same for every neighbour, so the neighbours'
    order, every class's share of the vote and the winner are DINO's. A class, not a function,
    so that skops head files can hold it."""

    def __init__(self, T: float) -> None:
        self.T = T

    def __call__(self, distances):
        """Each query's weights, scaled by exp(d_min / T) (the same for all of its neighbours):
        no T underflows them all to zero."""
        d = np.asarray(distances, dtype=np.float64)
        return np.exp(-(d - d.min(axis=-1, keepdims=True)) / self.T)


@register("knn", "sklearn")
class KNNHead(Head):
    """scikit-learn's KNeighborsClassifier, brute force on cosine distance, weights exp(-d / T)
    (:class:`DinoWeights`): DINO's k-NN protocol; ``k`` larger than the training rows uses
    every row."""

    def __init__(self, k: int = 20, T: float = 0.07) -> None:
        self.k = k
        self.T = T

    def _fit(self, X, y) -> None:
        from sklearn.neighbors import KNeighborsClassifier

        check_knn(self.k, self.T)
        self.model_ = KNeighborsClassifier(n_neighbors=int(min(self.k, X.shape[0])), metric="cosine",
                                           algorithm="brute", weights=DinoWeights(float(self.T)))
        self.model_.fit(X, y)
        self.classes_ = np.asarray(self.model_.classes_)

    def neighbours(self, X, k: int | None = None):
        """(cosine similarities, training-row indices) of each row's k nearest training rows,
        most similar first."""
        X = self._checked(X)
        d, index = self.model_.kneighbors(X, n_neighbors=min(k or self.model_.n_neighbors,
                                                             self.model_.n_samples_fit_))
        return 1.0 - d, index

    def predict(self, X):
        X = self._checked(X)
        return np.asarray(self.model_.predict(X))

    def predict_proba(self, X):
        X = self._checked(X)
        return np.asarray(self.model_.predict_proba(X))

    def decision_function(self, X):
        """Log shares of the vote (one column, log p1 - log p0, for two classes)."""
        logs = np.log(np.clip(self.predict_proba(X), 1e-300, None))
        return logs[:, 1] - logs[:, 0] if logs.shape[1] == 2 else logs
