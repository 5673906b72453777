"""The GPU code paths' safety, checked on the CPU where the behaviour shows there (issue 22):
memory budgets of the torch heads, one-line out-of-memory errors, stream-safe decoding."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification

from featurekit.heads._torch import _kernels, _linear


def _data(n=300, d=20, classes=4):
    X, y = make_classification(n, d, n_informative=8, n_classes=classes, random_state=0)
    return X.astype(np.float32), y


def test_lbfgs_members_split_to_fit_the_budget_give_one_batchs_answers(monkeypatch):
    """On a GPU every C of a grid is one L-BFGS batch; a memory budget splits them into
    batches that fit it. Forced on the CPU: each objective call holds at most the members the
    budget allows, and the solutions equal the single batch's."""
    X, y = _data()
    grid = [{"C": c} for c in (0.01, 0.1, 1.0, 10.0, 100.0)]
    folds = [(np.arange(0, 240), np.arange(240, 300))]
    monkeypatch.setattr(_linear, "batch_on", lambda device: True)
    seen: list[int] = []
    real = _linear._LinearProblem.__call__

    def counting(self, theta, members):
        seen.append(theta.shape[0])
        return real(self, theta, members)

    monkeypatch.setattr(_linear._LinearProblem, "__call__", counting)
    Xs = torch.as_tensor(X[:240])
    states = {}
    for budget, per in ((1e6, 5), (0.08, 2)):  # MiB: all five C values together; two at a time
        head = _linear.TorchLogisticHead(device="cpu", memory_budget=budget)
        assert _linear.members_per_batch(240, 20, 4, 4, head._budget("cpu")) >= per
        seen.clear()
        states[budget] = head._solve(Xs, y[:240], np.unique(y), grid, None)
        assert max(seen) == per, (budget, seen[:5])
    for (a, _, ok_a), (b, _, ok_b) in zip(states[1e6], states[0.08]):
        assert ok_a == ok_b
        np.testing.assert_allclose(a["coef_"], b["coef_"], rtol=1e-4, atol=1e-5)
    scores, _ = _linear.TorchLogisticHead(device="cpu", memory_budget=0.08).fit_grid(
        X, y, grid, folds, lambda t, p: float(np.mean(t == p)))
    assert scores.shape == (5, 1)


def test_a_bad_memory_budget_is_a_value_error():
    X, y = _data(60)
    with pytest.raises(ValueError, match="memory_budget must be a positive number of MiB"):
        _linear.TorchLogisticHead(device="cpu", memory_budget=0)._budget("cpu")


def test_kernel_blocks_are_built_within_their_temporaries_budget(monkeypatch):
    """rbf_blocks builds each pair's m x m block a slab of rows at a time: no product it
    makes holds more than its chunk budget, whatever m, and the blocks equal the whole
    kernel."""
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(size=(400, 16)), dtype=torch.float32)
    rows = torch.stack([torch.arange(0, 300), torch.arange(100, 400)])
    sq = (X * X).sum(1)[rows]
    sizes: list[int] = []
    real = _kernels.from_dots

    def recording(sq_a, sq_b, dots, gamma):
        sizes.append(dots.numel() * dots.element_size())
        return real(sq_a, sq_b, dots, gamma)

    monkeypatch.setattr(_kernels, "from_dots", recording)
    budget = 64 << 10  # 64 KiB: a 300 x 300 float32 block is 352 KiB
    blocks = _kernels.rbf_blocks(X, rows, sq, 0.05, chunk_bytes=budget)
    assert len(sizes) > 2 and 4 * max(sizes) <= budget, (len(sizes), max(sizes))
    for p in range(2):
        np.testing.assert_allclose(blocks[p].numpy(), _kernels.rbf(X[rows[p]], X[rows[p]], 0.05).numpy(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head,param", [(_linear.TorchLogisticHead, "memory_budget"),
                                        ("svm", "cache_size")])
def test_running_out_of_device_memory_is_one_line_naming_what_to_lower(monkeypatch, head, param):
    from featurekit.errors import ResourceError
    from featurekit.heads._torch._svm import TorchSVMHead

    cls = TorchSVMHead if head == "svm" else head

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cls, "_solve", oom)
    X, y = _data(60)
    with pytest.raises(ResourceError, match=f"ran out of memory on cpu .*lower its {param}") as e:
        cls(device="cpu").fit(X, y)
    assert "\n" not in str(e.value)


def test_every_device_decode_runs_inside_stream_safe(monkeypatch):
    """nvJPEG and the hardware engines write on streams of their own: every decode call, the
    batched one and the per-image retries, runs inside stream_safe (which waits for the current
    stream before and after, on CUDA)."""
    import torchvision.io as tio
    from torchvision.io import encode_jpeg

    from featurekit import _decode

    events: list[str] = []

    @contextlib.contextmanager
    def recording(device):
        events.append("enter")
        try:
            yield
        finally:
            events.append("exit")

    real = tio.decode_jpeg

    def decoding(*a, **k):
        events.append("decode")
        return real(*a, **k)

    monkeypatch.setattr(_decode, "stream_safe", recording)
    monkeypatch.setattr(tio, "decode_jpeg", decoding)
    good = encode_jpeg(torch.full((3, 24, 24), 90, dtype=torch.uint8))
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff broken"), dtype=torch.uint8)
    out = _decode._decode_batch([good, bad], "cpu", None)  # one bad file fails the batch
    assert out == [None, None] and events == ["enter", "decode", "exit"]  # exit: also on errors
    events.clear()
    assert _decode._nvjpeg_one(good, "cpu") is not None and _decode._nvjpeg_one(bad, "cpu") is None
    assert events == ["enter", "decode", "exit", "enter", "decode", "exit"]
    with _decode.stream_safe("cpu"):  # a no-op off CUDA
        pass


SYNCS = ("__bool__", "__int__", "__float__", "item", "tolist", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def counting_syncs(monkeypatch):
    """Counts the tensor methods that make the host wait for the device (on a GPU)."""
    count = [0]
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, **k):
            count[0] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    yield count
    monkeypatch.undo()


def test_smo_steps_do_not_wait_for_the_device(monkeypatch):
    """The SVM's SMO loop looks at the batch from the host every CHECK_EVERY steps only (as on
    a GPU): host syncs per step well under one, and the same solution as looking every step."""
    from featurekit.heads._torch import _svm

    X, y = _data(240, 10, 3)
    Xs = torch.as_tensor(X)
    pairs = _svm.pairs_of(np.searchsorted(np.unique(y), y), 3)
    base = _svm.solve(Xs, pairs, [1.0, 10.0], 0.1)
    monkeypatch.setattr(_svm, "_check_every", lambda dev: 16)
    with counting_syncs(monkeypatch) as syncs:
        sols = _svm.solve(Xs, pairs, [1.0, 10.0], 0.1)
    steps = max(s.n_iter for per_c in sols for s in per_c)
    assert steps > 100 and syncs[0] / steps < 0.5, (syncs[0], steps)
    for per_c, ref_c in zip(sols, base):
        for s, r in zip(per_c, ref_c):
            assert s.n_iter == r.n_iter and s.converged == r.converged
            np.testing.assert_array_equal(s.alpha, r.alpha)


def test_lbfgs_iterations_do_not_wait_for_the_device(monkeypatch):
    """Batched L-BFGS looks from the host every CHECK_EVERY iterations (as on a GPU) and once
    per iteration for the line search (does any member need a second trial?): about one sync
    per iteration where the solver took 6-10 before, and the same solutions as looking every
    iteration."""
    from featurekit.heads._torch import _lbfgs

    X, y = _data(300, 20, 4)
    Xs, _ = _linear.standardised(torch.as_tensor(X))
    problem = _linear._LinearProblem(Xs, y, 4, "logistic",
                                     torch.tensor([0.1, 1.0, 10.0], dtype=Xs.dtype))
    base = _lbfgs.minimize(problem, problem.start(3))
    monkeypatch.setattr(_lbfgs, "_check_every", lambda device: 8)
    with counting_syncs(monkeypatch) as syncs:
        res = _lbfgs.minimize(problem, problem.start(3))
    iterations = int(res.n_iter.max())
    assert iterations > 10 and syncs[0] <= 1.5 * iterations, (syncs[0], iterations)
    assert torch.equal(res.n_iter, base.n_iter) and torch.equal(res.converged, base.converged)
    torch.testing.assert_close(res.theta, base.theta)


def test_hardware_decoders_are_released_while_the_context_lives(monkeypatch):
    """nvImageCodec decoders are dropped at the end of a run, and at exit by a handler
    registered when the first is made (never left to the interpreter's teardown)."""
    import atexit

    from featurekit._decode import HwDecoder

    registered = []
    monkeypatch.setattr(atexit, "register", lambda fn: registered.append(fn))
    monkeypatch.setattr(HwDecoder, "__init__", lambda self, device: None)
    monkeypatch.setattr(HwDecoder, "_made", {})
    a = HwDecoder.on("cuda:0")
    assert HwDecoder.on("cuda:0") is a and registered == [HwDecoder.release]
    HwDecoder.on("cuda:1")
    HwDecoder.release("cuda:0")
    assert list(HwDecoder._made) == ["cuda:1"]
    registered[0]()
    assert HwDecoder._made == {}


PEAK = """
import resource, sys
import numpy as np, torch
from featurekit.heads._torch import _linear
torch.set_num_threads(1)
rng = np.random.default_rng(0)
n, d, k = 10000, 32, 100
X = torch.as_tensor(rng.normal(size=(n, d)).astype(np.float32))
y = rng.integers(0, k, n)
_linear.batch_on = lambda dev: True  # as on a GPU: the C values batched
Xs, _ = _linear.standardised(X)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_linear.TorchLogisticHead(device="cpu", memory_budget=float(sys.argv[1]), max_iter=10)._solve(
    Xs, y, np.arange(k), [{"C": c} for c in (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30)], None)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_lbfgs_peak_memory_follows_the_budget():
    """Measured, not counted: the peak resident memory a batched selection adds (eight C
    values, 10,000 rows x 100 classes) stays within its memory_budget (+25% and 40 MiB of
    fixed costs) when split, and is far above it as one batch."""
    import subprocess
    import sys

    def growth(budget: float) -> float:
        r = subprocess.run([sys.executable, "-c", PEAK, str(budget)], capture_output=True, text=True,
                           timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        return float(r.stdout.split()[-1])

    split, whole = growth(35), growth(1e6)  # 35 MiB: one C at a time (about 32 MB each)
    assert split <= 1.25 * 35 + 40, (split, whole)  # measured 44-46 MiB
    assert whole >= 2.5 * split, (split, whole)  # measured 228-314 MiB


def test_padding_out_of_memory_is_not_retried_image_by_image(monkeypatch):
    """Out of memory while padding a batch is raised (a smaller --batch-size is the fix), not
    swallowed into the slower per-image copy that would run out again."""
    from featurekit import _resize

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.nested, "as_nested_tensor", oom)
    images = [torch.zeros(3, 8, 9, dtype=torch.uint8), torch.zeros(3, 5, 4, dtype=torch.uint8)]
    with pytest.raises(torch.OutOfMemoryError):
        _resize.padded(images)

    def old_torch(*a, **k):
        raise NotImplementedError("no nested tensors here")

    monkeypatch.setattr(torch.nested, "as_nested_tensor", old_torch)
    assert _resize.padded(images).shape == (2, 3, 8, 9)  # the per-image copy still serves


def test_warm_path_with_gpu_batches_solves_each_batch_from_zero(monkeypatch):
    """warm_path is a CPU path: with a GPU's batches (split by memory_budget) every batch
    starts from zero (a warm start from another batch's solutions would index past it)."""
    X, y = _data(200)
    monkeypatch.setattr(_linear, "batch_on", lambda device: True)
    head = _linear.TorchLogisticHead(device="cpu", warm_path=True, memory_budget=0.08)
    sols = head._solve(torch.as_tensor(X), y, np.unique(y), [{"C": c} for c in (0.1, 1.0, 10.0)], None)
    assert len(sols) == 3 and all(ok for _, _, ok in sols)


def test_each_run_and_restart_has_its_own_keys_in_the_store(monkeypatch):
    """torchrun keeps one store across --max-restarts attempts, and a Python caller may run
    several commands in one process: their failures and barriers never meet."""
    import torch.distributed as dist

    from featurekit import _dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(_dist, "_heartbeat", lambda d: None)
    a, _ = _dist.init("cpu")
    b, _ = _dist.init("cpu")
    assert a.prefix.startswith("featurekit/3/") and b.prefix.startswith("featurekit/3/")
    assert a.prefix != b.prefix
    _dist._CURRENT.clear()
