"""CachedLauncher: which launches reuse a compiled kernel, and the fallbacks. No GPU and no Triton needed: a
fake kernel records launches, and a tensor subclass stands in for a CUDA tensor."""

from __future__ import annotations

import pytest
import torch

from lorakit.adapters import triton_launch
from lorakit.adapters.triton_launch import CachedLauncher, _arg_key


class _Cuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, so the launcher takes its direct path."""

    @property
    def is_cuda(self) -> bool:
        return True


def _cuda(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_subclass(_Cuda, t)


class _Compiled:
    def __init__(self, log: list, fail: bool = False) -> None:
        self.log, self.fail = log, fail
        self.function, self.packed_metadata = "function", "metadata"

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit_, *args):
        if self.fail:
            raise TypeError("another Triton's signature")
        self.log.append(("direct", (g0, g1, g2), args))


class _Kernel:
    """Records ``kernel[grid](*args, **kwargs)`` launches like a ``@triton.jit`` function."""

    arg_names = ("x", "n", "BLOCK", "FLAG")

    def __init__(self, fail_direct: bool = False) -> None:
        self.log: list = []
        self.fail_direct = fail_direct

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return _Compiled(self.log, self.fail_direct)

        return launch


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    pytest.importorskip("triton", reason="the direct launch reads triton.knobs")
    monkeypatch.setattr(CachedLauncher, "direct", True)


def test_arg_key_separates_what_triton_specializes_on() -> None:
    ints = [_arg_key(v) for v in (1, 16, 17, 2**31, 2**63)]
    assert len(set(ints)) == len(ints)
    assert _arg_key(32) == _arg_key(48) and _arg_key(3) == _arg_key(5)
    buf = torch.zeros(64)
    assert _arg_key(buf) != _arg_key(buf[1:])  # 4 bytes past a 16-byte boundary
    assert _arg_key(buf) != _arg_key(buf.half())
    assert _arg_key(True) != _arg_key(1)
    with pytest.raises(TypeError, match="no key"):
        _arg_key("text")


def test_second_launch_with_the_same_specialization_skips_triton(fake_cuda) -> None:
    kernel = _Kernel()
    launcher = CachedLauncher(kernel)
    x = _cuda(torch.zeros(64))
    launcher((4,), (x, 32), (128, True), num_warps=4)
    launcher((8, 2), (x, 48), (128, True), num_warps=4)  # 48: divisible by 16, like 32
    assert [entry[0] for entry in kernel.log] == ["triton", "direct"]
    assert kernel.log[0][3] == {"BLOCK": 128, "FLAG": True, "num_warps": 4}  # constexprs by name
    assert kernel.log[1][1] == (8, 2, 1) and kernel.log[1][2] == (x, 48, 128, True)
    # a new class of integer, alignment, constexpr or option compiles (through Triton) once more
    launcher((4,), (x, 33), (128, True), num_warps=4)
    launcher((4,), (_cuda(torch.zeros(64)[1:]), 32), (128, True), num_warps=4)
    launcher((4,), (x, 32), (64, True), num_warps=4)
    launcher((4,), (x, 32), (128, True), num_warps=8)
    assert [entry[0] for entry in kernel.log[2:]] == ["triton"] * 4


def test_cpu_tensors_and_unknown_arguments_go_through_triton(fake_cuda) -> None:
    kernel = _Kernel()
    launcher = CachedLauncher(kernel)
    for _ in range(2):
        launcher((1,), (torch.zeros(4), 16), (8, False))  # not CUDA: the interpreter's path
        launcher((1,), (_cuda(torch.zeros(4)), None), (8, False))  # None: no key
    assert [entry[0] for entry in kernel.log] == ["triton"] * 4


def test_a_failing_direct_launch_falls_back_for_good(fake_cuda, caplog) -> None:
    kernel = _Kernel(fail_direct=True)
    launcher = CachedLauncher(kernel)
    x = _cuda(torch.zeros(64))
    for _ in range(3):
        launcher((1,), (x, 16), (8, False))
    assert [entry[0] for entry in kernel.log] == ["triton"] * 3
    assert CachedLauncher.direct is False
    assert "direct launch failed" in caplog.text
    assert triton_launch.LOG.name == "lorakit.adapters.triton_launch"
