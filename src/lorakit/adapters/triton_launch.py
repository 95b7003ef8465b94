"""Launching a compiled Triton kernel for less host time than ``kernel[grid](...)`` takes.

Eager LoRA steps are bound by host time (benchmarks/RESULTS.md). On the H100 host, ``kernel[grid](...)``
took 26.7 µs per launch of the merge kernel (tiny tensors, ``benchmarks/host_overhead.py``). Of that, 8.4 µs
was the launch through the compiled kernel that Triton keeps. The rest is Triton binding the arguments and
building its cache key again on every call. :class:`CachedLauncher` keys the compiled kernel on what Triton
specializes a launch on: each tensor's dtype and 16-byte alignment; each integer being 1, divisible by 16,
or outside 32 bits; the constexprs and the launch options. It makes the first launch of a key through
Triton and launches the kernel Triton returned directly after that.

Anything else falls back to ``kernel[grid](...)``: the interpreter, a Triton whose compiled-kernel call
differs, an argument of another type.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

LOG = logging.getLogger(__name__)


def _arg_key(arg: object) -> object:
    """What Triton's specialization sees in one runtime argument (a key part, not Triton's own format)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return bool, arg
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31, arg < 2**63
    if isinstance(arg, float):
        return float
    raise TypeError(f"CachedLauncher: no key for an argument of type {type(arg).__name__}")


class CachedLauncher:
    """Launch ``kernel`` (a ``@triton.jit`` function) as ``kernel[grid](*args, **constexprs, **options)``
    would, reusing the compiled kernel of an earlier launch with the same specialization.

    ``args`` are the runtime arguments, the first a tensor; ``constexprs`` the values of the parameters that
    follow them, in signature order.
    """

    #: False after a direct launch failed once (an unexpected Triton version): every launch goes through
    #: Triton from then on
    direct = True

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self._compiled: dict[tuple, object] = {}

    def __call__(
        self, grid: Sequence[int], args: Sequence[object], constexprs: Sequence[object], **options: int
    ) -> None:
        key = None
        if CachedLauncher.direct and args[0].is_cuda:  # not the CPU interpreter
            try:
                key = (torch.cuda.current_device(), tuple(constexprs), *options.items(), *map(_arg_key, args))
            except TypeError:  # an argument of another type: Triton's own path
                key = None
        compiled = self._compiled.get(key) if key is not None else None
        if compiled is None:
            names = self.kernel.arg_names[len(args) :]
            compiled = self.kernel[tuple(grid)](*args, **dict(zip(names, constexprs, strict=True)), **options)
            if key is not None and compiled is not None:
                self._compiled[key] = compiled
            return
        try:
            self._launch(compiled, grid, (*args, *constexprs))
        except (TypeError, AttributeError, ImportError) as error:  # another Triton version's internals
            LOG.warning("CachedLauncher: direct launch failed (%s); launching through Triton", error)
            CachedLauncher.direct = False
            self(grid, args, constexprs, **options)

    @staticmethod
    def _launch(compiled, grid: Sequence[int], full_args: tuple) -> None:
        """What ``JITFunction.run`` does once it has the compiled kernel (Triton 3.x)."""
        from triton import knobs

        stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        compiled.run(
            grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata,
            compiled.launch_metadata(tuple(grid), stream, *full_args),
            knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *full_args,
        )  # fmt: skip
