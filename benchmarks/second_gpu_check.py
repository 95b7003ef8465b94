"""The fused path's GPU check on both GPUs of a process whose current device is the first.

A model split over GPUs in one process (``device_map``-style placement) runs adapted layers on a GPU that
is not the current device. Triton launches on the current device, so lorakit makes the tensors' device
current around such launches (``triton_lora._launch_kernel``). This runs ``throughput.py``'s float64
checks (every case twice: Triton's launch, then the direct one) of the fused layer, the sibling groups and
the product-input and gated-MLP passes with all tensors on ``cuda:0``, the current device, and then on
``cuda:1`` while ``cuda:0`` stays current; then the fullgraph ``torch.compile`` check of one adapted Llama
block on each GPU. It exits non-zero if any case disagrees. Needs two GPUs.

    cd benchmarks && PYTHONPATH=../src python3 second_gpu_check.py
"""

from __future__ import annotations

import json
import logging

import torch
from throughput import check_fused, check_grouped, check_product, compile_check

logger = logging.getLogger("second_gpu_check")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if torch.cuda.device_count() < 2:
        raise SystemExit("second_gpu_check.py needs two CUDA GPUs")
    torch.cuda.set_device(0)
    results = {
        f"{check.__name__} on {device}": check(device)
        for device in ("cuda:0", "cuda:1")
        for check in (check_fused, check_grouped, check_product)
    }
    summary = {
        name: {
            "ok": result["ok"],
            "cases": len(result["cases"]),
            "worst_rel_err": max(
                e for case in result["cases"] for e in case["rel_err"].values() if e is not None
            ),
        }
        for name, result in results.items()
    }
    compiled = {f"compile_check on {device}": compile_check(device) for device in ("cuda:0", "cuda:1")}
    logger.info(
        "%s", json.dumps({"current_device": torch.cuda.current_device(), **summary, **compiled}, indent=1)
    )
    return 0 if all(s["ok"] for s in (*summary.values(), *compiled.values())) else 1


if __name__ == "__main__":
    raise SystemExit(main())
