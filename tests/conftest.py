"""Hypothesis profiles for the whole suite.

"ci" (the default) keeps every property test to a handful of examples with no deadline (the
machines are small and shared, and a first call compiles a layer) and derandomizes, so a run is
reproducible and a failure is the same failure on every machine. "thorough" is for hunting
bugs locally: `HYPOTHESIS_PROFILE=thorough pytest tests/codegen`.
"""
import os

# The Triton interpreter, before anything can import triton: `import torch._dynamo` (and
# inductor) imports it, and triton's own library functions (tl.cdiv, the reduction combiners)
# are @triton.jit'd when triton is imported, interpreted or not for the rest of the process.
# Set in a test module it came too late whenever an earlier-collected module (the torch.compile
# tests) had imported triton: every interpreted kernel then failed with "Cannot call
# @triton.jit'd outside of the scope of a kernel". PSMC_TEST_DEVICE=cuda runs on a real GPU.
if os.environ.get("PSMC_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton_interpreter  # noqa: E402  (tests/triton_interpreter.py: a third faster)

    triton_interpreter.install()

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=60,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def private_psmc_cache(tmp_path_factory):
    """PSMC_CACHE_DIR for the whole session: every test compiles and analyses into a private
    directory, never the user's cache (session scope: hypothesis tests may not use
    function-scoped fixtures, and compiled modules are reused across tests). Under pytest-xdist
    the workers share one directory (the run's base temp), so an op compiled or a C++ kernel
    built by one worker is a cache hit for the others (every cache write is an atomic rename)."""
    previous = os.environ.get("PSMC_CACHE_DIR")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "psmc_cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("psmc_cache")
    os.environ["PSMC_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("PSMC_CACHE_DIR", None)
    else:
        os.environ["PSMC_CACHE_DIR"] = previous


def pytest_configure(config):
    # pytest-xdist's loadfile hands out files largest first by default (--loadscope-reorder):
    # the order below is what it should follow (measured: the reordering started the fuzz slice
    # and the ahead-of-time compiles 12 and 20 minutes into a 30-minute run)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Tests marked heavy or slow first (stable order otherwise). Under `pytest -n auto --dist
    loadfile` xdist hands out whole files in the order of their first test (pytest_configure
    turns off its own reordering), so the files with long tests start first and the workers
    finish together (a file stays on one worker: its module fixtures and compiled layers are
    built once)."""
    items.sort(key=lambda item: not any(item.get_closest_marker(m) for m in ("heavy", "slow")))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: optional, so -p no:xdist still runs
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 8 (each worker holds torch, Triton's interpreter
    and a few compiled layers: about 1 GB)."""
    return max(1, min(8, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """The tests run thousands of tiny torch calls; on a small shared machine intra-op
    threads only contend (measured: a transformer_psm step 14x slower with the default)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def auto_backend_without_cpp():
    """backend='auto' would build the fused C++ kernels for every op the suite compiles (a
    second or more per op on a loaded machine); tests/codegen/test_cpu.py exercises them with
    backend='cpu' (and 'auto' explicitly), the rest of the suite the torch backend."""
    previous = os.environ.get("PSMC_CPU")
    os.environ["PSMC_CPU"] = "0"
    yield
    if previous is None:
        os.environ.pop("PSMC_CPU", None)
    else:
        os.environ["PSMC_CPU"] = previous


# ---------------------------------------------------------------------- tests on a GPU
# PSMC_TEST_DEVICE=cuda (with TRITON_INTERPRET=0): the Triton tests run their kernels compiled
# for the GPU (benchmarks/gpu_check.sh). Every tensor a factory function creates without an
# explicit device is created as usual (a CPU generator keeps its seeds) and moved to the device,
# so the tests need no per-file changes; leaves that ask for gradients stay leaves.
_FACTORIES = ("randn", "rand", "randint", "zeros", "ones", "empty", "full", "arange", "linspace", "tensor", "eye")


class _OnDevice(torch.overrides.TorchFunctionMode):
    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.funcs = {getattr(torch, name) for name in _FACTORIES}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func not in self.funcs or kwargs.get("device") is not None:
            return func(*args, **kwargs)
        grad = kwargs.pop("requires_grad", False)
        out = func(*args, **kwargs).to(self.device)
        return out.requires_grad_(grad) if grad else out


@pytest.fixture(scope="session", autouse=True)
def test_device():
    device = os.environ.get("PSMC_TEST_DEVICE")
    if not device or device == "cpu":
        yield
        return
    with _OnDevice(device):
        yield
