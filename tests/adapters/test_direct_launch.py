"""``triton_lora._launch_kernel``: kernels launched again through the compiled kernel of a first launch.

The GPU benchmark checks the direct launches of the real kernels against float64 (``throughput.py``,
``check_grouped`` runs each case through Triton's launch and then the direct one). Here, without a GPU, a
stand-in kernel checks what the launcher is given: Triton's launch the first time, then the compiled
kernel's launcher with the arguments in the order Triton passes them.
"""

from __future__ import annotations

import contextlib

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the kernels are GPU-only; pip install triton)")

from lorakit.adapters import triton_lora as tk

pytestmark = pytest.mark.skipif(not tk.AVAILABLE, reason="triton_lora did not load its kernels")


class _Compiled:
    """What ``kernel[grid](...)`` returns: a loaded kernel whose launcher records its calls."""

    def __init__(self, calls: list) -> None:
        self.function = "cu-function"
        self.packed_metadata = ("metadata",)
        self.run = lambda *launch: calls.append(("direct", launch))


class _Kernel:
    """A stand-in ``@triton.jit`` kernel with two runtime arguments and two constexprs."""

    arg_names = ("x_ptr", "n", "BLOCK", "FLAG")

    def __init__(self, compiled: bool = True) -> None:
        self.calls: list = []
        self.compiled = compiled

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return _Compiled(self.calls) if self.compiled else None

        return launch


@pytest.fixture
def current(monkeypatch) -> list:
    """The devices made current around launches (a stand-in for ``torch.cuda.device``); device 0 is
    current otherwise."""
    entered: list = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(tk.torch.cuda, "device", device)
    monkeypatch.setattr(tk, "_current_device", lambda: 0)
    return entered


@pytest.fixture
def launcher(monkeypatch, current):
    monkeypatch.setattr(tk, "_COMPILED", {})
    monkeypatch.setattr(tk, "_current_stream", lambda device: f"stream-{device}")
    monkeypatch.setattr(tk, "DIRECT_LAUNCH", True)
    return tk._launch_kernel


def test_first_launch_compiles_then_the_compiled_kernel_is_launched_directly(launcher) -> None:
    kernel = _Kernel()
    # constexprs given out of signature order: the launcher must get them in the kernel's order
    constexprs = {"FLAG": True, "BLOCK": 64}
    launcher(kernel, ("k", 0), (3, 2), ("x", 10), constexprs, num_warps=4)
    assert kernel.calls == [("triton", (3, 2), ("x", 10), {"FLAG": True, "BLOCK": 64, "num_warps": 4})]
    launcher(kernel, ("k", 0), (5, 1), ("y", 12), constexprs, num_warps=4)
    assert kernel.calls[1] == (
        "direct",
        (5, 1, 1, "stream-0", "cu-function", ("metadata",), None, None, None, "y", 12, 64, True),
    )
    launcher(kernel, ("k2", 0), (5, 1), ("y", 12), constexprs, num_warps=4)  # another key: Triton again
    assert kernel.calls[2][0] == "triton"


def test_tensors_on_another_gpu_launch_through_triton_with_their_device_current(launcher, current) -> None:
    kernel = _Kernel()
    for _ in range(2):
        launcher(kernel, ("k", 1), (2, 2), ("x", 8), {"BLOCK": 16, "FLAG": True})
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]
    assert current == [1, 1]
    assert tk._COMPILED == {}


def test_no_direct_launch_when_switched_off_or_without_a_compiled_kernel(launcher, monkeypatch) -> None:
    interpreted = _Kernel(compiled=False)  # the Triton interpreter returns no compiled kernel
    for _ in range(2):
        launcher(interpreted, ("k", None), (1, 1), ("x", 1), {"BLOCK": 16, "FLAG": False})
    assert [c[0] for c in interpreted.calls] == ["triton", "triton"]
    assert tk._COMPILED == {}
    monkeypatch.setattr(tk, "DIRECT_LAUNCH", False)
    kernel = _Kernel()
    for _ in range(2):
        launcher(kernel, ("k", 0), (1, 1), ("x", 1), {"BLOCK": 16, "FLAG": False})
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]
    assert tk._COMPILED == {}


def test_a_launcher_that_takes_other_arguments_turns_direct_launches_off(launcher, caplog) -> None:
    kernel = _Kernel()
    launcher(kernel, ("k", 0), (1, 1), ("x", 1), {"BLOCK": 16, "FLAG": False})

    def other_interface(*launch):
        raise TypeError("function takes exactly 14 arguments (13 given)")

    _, *rest = tk._COMPILED[("k", 0)]
    tk._COMPILED[("k", 0)] = (other_interface, *rest)
    with caplog.at_level("WARNING", logger=tk.__name__):
        launcher(kernel, ("k", 0), (1, 1), ("x", 1), {"BLOCK": 16, "FLAG": False})
    # the failed direct call launched nothing; Triton's launch ran instead, and does from now on
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]
    assert tk.DIRECT_LAUNCH is False and tk._COMPILED == {}
    assert "DIRECT_LAUNCH" in caplog.text
    launcher(kernel, ("k", 0), (1, 1), ("x", 1), {"BLOCK": 16, "FLAG": False})
    assert [c[0] for c in kernel.calls] == ["triton", "triton", "triton"]


class _TooLarge(_Kernel):
    """A stand-in kernel whose launches with more than ``fits`` pipeline stages do not fit the GPU."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def checked(*args, **kwargs):
            if kwargs.get("num_stages", 1) > self.fits:
                raise tk._DoesNotFitError(262144, 232448, "shared memory")  # (required, limit, name)
            return launch(*args, **kwargs)

        return checked


def test_a_launch_that_does_not_fit_runs_in_one_stage_and_is_kept(launcher, caplog) -> None:
    kernel = _TooLarge(fits=1)
    with caplog.at_level("WARNING", logger=tk.__name__):
        launcher(kernel, ("k", 0), (2, 1), ("x", 8), {"BLOCK": 16, "FLAG": True}, num_warps=4, num_stages=3)
    assert kernel.calls[0][3] == {"BLOCK": 16, "FLAG": True, "num_warps": 4, "num_stages": 1}
    assert "one stage" in caplog.text
    launcher(kernel, ("k", 0), (2, 1), ("x", 8), {"BLOCK": 16, "FLAG": True}, num_warps=4, num_stages=3)
    assert [c[0] for c in kernel.calls] == ["triton", "direct"]  # the one-stage kernel, launched directly


def test_a_launch_that_does_not_fit_in_one_stage_names_the_way_out(launcher) -> None:
    kernel = _TooLarge(fits=0)
    with pytest.raises(RuntimeError, match="LORAKIT_TRITON=0"):
        launcher(kernel, ("k", 0), (2, 1), ("x", 8), {"BLOCK": 16, "FLAG": True}, num_stages=2)
    assert kernel.calls == [] and tk._COMPILED == {}
