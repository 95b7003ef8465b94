"""``lorakit rank-advisor``: the LoRA rank a fine-tune actually needs, per weight, layer type and overall."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lorakit.cli import LorakitError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rank-advisor",
        help="spectrum of W_tuned - W_base and the smallest LoRA rank within a tolerance",
        description=(
            "For each adapted weight, the singular values of ΔW = W_tuned - W_base (or s·B·A of a LoRA "
            "adapter) and the smallest rank keeping the relative Frobenius / spectral error <= tol; "
            "summaries per layer type and overall, plus the Zeng-Lee distributed bound for stacks of "
            "consecutive layers."
        ),
        epilog=(
            "example: lorakit rank-advisor --base ./bert-base --tuned ./bert-ft --tol 0.1 --out runs/adv\n"
            "         lorakit rank-advisor --base ./bert-base --tuned ./my-adapter --group-size 2"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--base",
        help="base model: folder of *.safetensors, a .safetensors file, or a hub name (transformers)",
    )
    parser.add_argument(
        "--tuned", required=True, help="fine-tuned model (same forms) or a LoRA adapter folder"
    )
    parser.add_argument(
        "--tol", type=float, default=0.1, help="relative error tolerance in (0, 1) (default 0.1)"
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=0,
        help="G >= 2: also report the Zeng-Lee distributed bound for G consecutive same-type layers "
        "(a theorem only for directly composed weights; a heuristic across transformer blocks)",
    )
    parser.add_argument("--out", help="folder for rank_advisor.json and rank_advisor.png")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.theory.advisor import advise, format_table, is_adapter, plot

    if args.base is None and not is_adapter(args.tuned):
        raise LorakitError("--base is required unless --tuned is a LoRA adapter folder")
    if args.base is None and args.group_size >= 2:
        raise LorakitError("--group-size needs --base (the stack bound multiplies base weights)")
    result = advise(args.base, args.tuned, tol=args.tol, group_size=args.group_size)
    print(format_table(result))
    if args.out:
        from lorakit.utils import atomic_write_json

        out = Path(args.out)
        atomic_write_json(out / "rank_advisor.json", result.as_dict())
        plot(result, out / "rank_advisor.png")
        logger.info("wrote %s and %s", out / "rank_advisor.json", out / "rank_advisor.png")
    return 0
