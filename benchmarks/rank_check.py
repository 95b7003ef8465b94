"""The GPU checks of ``throughput.py`` at every LoRA rank a user may pick, counting the Triton launches.

The Triton kernels hold rank-wide tiles, so their block sizes depend on the rank
(``triton_lora._fit_config``), and ranks above ``triton_lora.MAX_RANK`` run torch ops. Per rank this runs the
fused, grouped and product checks (bf16 and fp32 against float64) and the fullgraph compile check of one
adapted Llama block, and counts the calls of each Triton entry point: every one of them must run up to
``MAX_RANK``, and none above it. Exits non-zero if any check fails. Needs a CUDA GPU with Triton.

    PYTHONPATH=src python benchmarks/rank_check.py --out out/rank_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from throughput import check_fused, check_grouped, check_product, compile_check, write_report

from lorakit.adapters import triton_lora

logger = logging.getLogger("rank_check")
#: The kernels' entry points, by family: each family must run at every rank it takes, and none above.
FAMILIES = {
    "merge": ("merge_lora_weight", "merge_lora_weights"),
    "grad": ("lora_grad_pass", "lora_grad_pass_group"),
    "product": ("product_backward",),
}
ENTRY_POINTS = tuple(name for names in FAMILIES.values() for name in names)


@contextlib.contextmanager
def counting(counts: Counter, names: tuple[str, ...] = ENTRY_POINTS) -> Iterator[None]:
    """Count the calls of the ``triton_lora`` entry points ``names`` into ``counts`` meanwhile (the library
    looks them up in the module on every call). Not around ``torch.compile``: it refuses a Function whose
    forward changes an outside variable."""
    originals = {name: getattr(triton_lora, name) for name in names}

    def counted(name: str, function: Callable) -> Callable:
        def run(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return run

    for name, function in originals.items():
        setattr(triton_lora, name, counted(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(triton_lora, name, function)


def families_ran(counts: Counter, families: dict[str, tuple[str, ...]] = FAMILIES) -> dict[str, int]:
    """The calls counted in ``counts`` (:func:`counting`), summed per kernel family."""
    return {family: sum(counts[name] for name in names) for family, names in families.items()}


def families_expected(ranks: Iterable[int]) -> dict[str, bool]:
    """Whether each kernel family must run for layers of ``ranks``: where some layer's rank is one it
    takes (:func:`triton_lora.supports_rank`, :func:`triton_lora.supports_grad_pass_rank`)."""
    ranks = tuple(ranks)
    merge = any(triton_lora.supports_rank(r) for r in ranks)
    return {
        "merge": merge,
        "grad": any(triton_lora.supports_grad_pass_rank(r) for r in ranks),
        "product": merge,
    }


def ran_as_expected(
    counts: Counter, ranks: Iterable[int], families: dict[str, tuple[str, ...]] = FAMILIES
) -> bool:
    """Whether every family in ``families`` ran (per ``counts``) exactly where :func:`families_expected`
    says it must."""
    expected = families_expected(ranks)
    return all((calls > 0) == expected[family] for family, calls in families_ran(counts, families).items())


def check_rank(rank: int, device: str, compiled: bool, tokens: int = 4096) -> dict:
    """Every check at ``rank`` on ``tokens`` rows (the compile check where ``compiled``), and the Triton
    entry points' call counts during the others."""
    counts: Counter = Counter()
    with counting(counts):
        checks = [
            check_fused(device, tokens, rank),
            check_grouped(device, tokens, rank),
            check_product(device, tokens, rank),
        ]
    compiled = compile_check(device, rank=rank) if compiled else {"ok": True, "error": "not run"}
    cases = [case for check in checks for case in check["cases"]]
    worst: dict[str, float] = {}
    for case in cases:
        errs = [e for e in case["rel_err"].values() if e is not None]
        worst[case["dtype"]] = max(worst.get(case["dtype"], 0.0), max(errs))
    return {
        "rank": rank,
        "tokens": tokens,
        "cases": len(cases),
        "failed": [case for case in cases if not case["pass"]],
        "worst_rel_err": worst,
        "compile_check": compiled,
        "triton_calls": dict(counts),
        "ok": all(check["ok"] for check in checks) and compiled["ok"] and ran_as_expected(counts, (rank,)),
    }


def render(rows: list[dict]) -> str:
    lines = [
        f"Checks per LoRA rank on {rows[0]['tokens'] if rows else 0} rows (merges and the product pass up to "
        f"rank {triton_lora.MAX_RANK}, the G/dB kernels up to {triton_lora.GRAD_PASS_MAX_RANK}; torch ops "
        "above):\n\n"
        "| rank | cases | failed | worst bf16 | worst fp32 | compile check | Triton calls | pass |\n"
        "|---|---|---|---|---|---|---|---|\n"
    ]
    for r in rows:
        compiled = r["compile_check"]
        compiled_text = (
            f"{compiled['worst_rel_err']:.2e}" if "worst_rel_err" in compiled else compiled["error"]
        )
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r["triton_calls"].items())) or "none"
        worst = r["worst_rel_err"]
        verdict = "PASS" if r["ok"] else "FAIL"
        lines.append(
            f"| {r['rank']} | {r['cases']} | {len(r['failed'])} | {worst.get('torch.bfloat16', 0):.2e} | "
            f"{worst.get('torch.float32', 0):.2e} | {compiled_text} | {calls} | {verdict} |\n"
        )
    return "".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", default="1,4,8,16,32,64,128,256", help="comma list of LoRA ranks")
    parser.add_argument(
        "--compile-ranks", default="8,64,128,256", help="ranks that also run the compile check (slow)"
    )
    parser.add_argument("--tokens", type=int, default=4096, help="rows of the checks (even)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/rank_check.json"), help="JSON path (.md beside)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not (torch.cuda.is_available() and triton_lora.AVAILABLE):
        raise SystemExit("rank_check.py needs a CUDA GPU with Triton")
    rows = []
    compile_ranks = {int(r) for r in args.compile_ranks.split(",") if r}
    for rank in (int(r) for r in args.ranks.split(",")):
        rows.append(check_rank(rank, "cuda", rank in compile_ranks, args.tokens))
        logger.info("rank %d: %s", rank, "PASS" if rows[-1]["ok"] else f"FAIL {rows[-1]}")
        write_report(args.out, {"rows": rows}, render(rows))
    print(render(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
