"""The byte counts behind ``benchmarks/lora_floor.py``: its factor counts are a real adapted Llama's, its
passes add up as the module docstring says, and each target's budget follows from the measured steps."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import LLAMA_TARGETS, tiny_llama

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lora_floor.py"
# tiny_llama's shape: width 32, MLP 48, 4 heads, 2 KV heads, 2 layers
TINY = {
    "layers": 2,
    "hidden": 32,
    "intermediate": 48,
    "heads": 4,
    "kv_heads": 2,
    "batch": 3,
    "seq": 5,
    "rank": 4,
}


@pytest.fixture(scope="module")
def floor():
    spec = importlib.util.spec_from_file_location("lora_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    sys.path.insert(0, str(SCRIPT.parent))  # it imports its sibling scripts, as when run from there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))
        del sys.modules[spec.name]


@pytest.mark.parametrize("train", ["AB", "B"])
def test_factor_counts_are_those_of_an_adapted_llama(floor, train) -> None:
    import lorakit

    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, targets=LLAMA_TARGETS, train=train))
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    a = sum(t.numel() for name, t in tensors.items() if name.endswith("lora_A"))
    b = sum(t.numel() for name, t in tensors.items() if name.endswith("lora_B"))
    assert floor.factor_counts(TINY) == (a, b)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = floor.state_over_peft(TINY, train_a=train == "AB")
    # float32 over bf16: 2 bytes more for each trained element and its two AdamW moments, and each frozen one
    frozen = 0 if train == "AB" else a
    assert state["total"] * floor.MiB == pytest.approx(3 * 2 * trained + 2 * frozen)


def test_pass_bytes_count_each_read_and_write(floor) -> None:
    tokens, rank, element = 15, 4, 2
    head_dim = 32 // 4
    outs = {"q/k/v": (32, 2 * head_dim, 2 * head_dim), "o": (32,), "gate/up": (48, 48), "down": (32,)}
    ins = {"q/k/v": 32, "o": 32, "gate/up": 32, "down": 48}
    assert [(g.name, g.in_features, g.out_features) for g in floor.llama_groups(TINY)] == [
        (name, ins[name], outs[name]) for name in outs
    ]
    parts = floor.pass_bytes(TINY, train_a=True)
    rank_r = {name: tokens * rank * len(o) * element for name, o in outs.items()}
    u = sum(tokens * ins[n] * element + rank_r[n] for n in outs)
    assert parts["u"] == parts["dA"] == 2 * u  # two layers
    assert parts["G and dB"] == 2 * sum(tokens * sum(outs[n]) * element + rank_r[n] for n in outs)
    # 15 tokens < every in and out: the output (forward) and input-gradient (backward) passes are cheaper
    assert parts["merge"] == 2 * sum(2 * tokens * o * element for n in outs for o in outs[n])
    assert parts["dX term, rebuilt"] == 2 * sum(2 * tokens * ins[n] * element for n in outs)
    a, b = floor.factor_counts(TINY)
    assert parts["AdamW"] == 28 * (a + b)

    frozen = floor.pass_bytes(TINY, train_a=False)
    assert frozen["dA"] == 0 and frozen["AdamW"] == 28 * b
    # an L2 larger than every activation leaves only the rank-r reads and writes of the re-reads
    cached = floor.pass_bytes(TINY, train_a=True, l2_bytes=2**30)
    assert cached["u"] == 2 * sum(rank_r.values())
    assert cached["merge"] == parts["merge"]

    many = floor.pass_bytes({**TINY, "batch": 64, "seq": 64}, train_a=True)  # 4096 tokens > every dim
    weights = sum(o * ins[n] for n in outs for o in outs[n])
    assert many["merge"] == 2 * 2 * weights * element
    rebuilt, kept, stacked = (floor.floor_ms(many, 1e-9, f) for f in ("rebuilt", "kept", "stacked"))
    # at 1e-9 TB/s (1 kB/s) a byte takes a millisecond
    assert rebuilt - kept == pytest.approx(many["dX term, rebuilt"])
    assert kept - stacked == pytest.approx(many["u"])


def _run(variant: str, mode: str, step_ms: float) -> dict:
    return {"variant": variant, "mode": mode, "step_ms": step_ms, "spec": TINY}


def test_budgets_follow_from_the_measured_steps(floor) -> None:
    runs = [
        _run("no-adapter", "eager", 100.0),
        _run("peft-default", "eager", 190.0),
        _run("peft-bf16", "eager", 130.0),
        _run("lorakit", "eager", 104.0),
        _run("no-adapter", "compile", 80.0),  # nothing else compiled: no compiled rows
    ]
    parts = {
        key: floor.pass_bytes(TINY, train_a=key if isinstance(key, bool) else key[0])
        for key in (True, False, (True, "l2"), (False, "l2"))
    }
    budgets = floor.budgets(runs, parts, {"nominal": 1.0, "measured": 0.5})
    # a target whose variant did not run still has a budget; compiled, only those against no-adapter
    assert [(row["mode"], row["target"], row["taken_ms"] is None) for row in budgets] == [
        ("eager", "lorakit ≥ 0.95 × no-adapter", False),
        ("compile", "lorakit ≥ 0.95 × no-adapter", True),
        ("eager", "lorakit ≥ 1.25 × peft-bf16", False),
        ("eager", "lorakit ≥ 2 × peft-default", False),
        ("eager", "lorakit-frozenA ≥ 0.97 × no-adapter", True),
        ("compile", "lorakit-frozenA ≥ 0.97 × no-adapter", True),
    ]
    rows = {row["target"]: row for row in budgets if row["mode"] == "eager"}
    assert rows["lorakit ≥ 0.95 × no-adapter"]["allowed_ms"] == pytest.approx(100 / 0.95 - 100)
    assert rows["lorakit ≥ 1.25 × peft-bf16"]["allowed_ms"] == pytest.approx(130 / 1.25 - 100)
    assert rows["lorakit ≥ 0.95 × no-adapter"]["taken_ms"] == pytest.approx(4.0)
    # twice PEFT default's tokens/s would need a step shorter than no adapters at all
    impossible = rows["lorakit ≥ 2 × peft-default"]
    assert impossible["allowed_ms"] < 0
    assert floor.verdict(impossible).startswith("impossible")
    row = rows["lorakit ≥ 0.95 × no-adapter"]
    assert row["floor_hbm_kept_measured"] == pytest.approx(2 * row["floor_hbm_kept_nominal"])
    assert row["floor_l2_kept_measured"] <= row["floor_hbm_kept_measured"]


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        (-1.0, "impossible"),
        (1.0, "below every floor"),
        (2.5, "only with u"),
        (3.5, "only with the merged"),
        (4.5, "0.50 ms above"),
    ],
)
def test_verdicts_name_the_least_a_target_needs(floor, allowed, expected) -> None:
    row = {"allowed_ms": allowed, "floor_hbm_stacked_measured": 2.0, "floor_hbm_kept_measured": 3.0}
    row["floor_hbm_rebuilt_measured"] = 4.0
    assert floor.verdict(row).startswith(expected)


def test_budget_writes_the_numbers_a_table_and_a_plot(floor, tmp_path) -> None:
    runs = [_run("no-adapter", "eager", 100.0), _run("lorakit", "eager", 106.0)]
    throughput = tmp_path / "eager.json"
    throughput.write_text(json.dumps({"runs": runs}), encoding="utf-8")
    hardware = tmp_path / "bandwidth.json"
    hardware.write_text(
        json.dumps({"gpu": "test GPU", "copy_tbps": 2.0, "l2_bytes": 2**20}), encoding="utf-8"
    )
    out = tmp_path / "floor" / "floor.json"
    argv = ["budget", "--throughput", str(throughput), "--hardware", str(hardware), "--out", str(out)]
    assert floor.main(argv) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["spec"]["layers"] == 2  # the spec of the throughput rows
    assert [row["target"] for row in report["budgets"]] == [
        "lorakit ≥ 0.95 × no-adapter",
        "lorakit-frozenA ≥ 0.97 × no-adapter",
    ]
    assert "| eager | lorakit ≥ 0.95 × no-adapter | 5.26 | 6.00 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_bad_inputs_are_refused_naming_the_file(floor, tmp_path, caplog) -> None:
    hardware = tmp_path / "bandwidth.json"
    hardware.write_text(json.dumps({"gpu": "test GPU", "copy_tbps": 2.0}), encoding="utf-8")
    good = tmp_path / "eager.json"
    good.write_text(json.dumps({"runs": [_run("no-adapter", "eager", 100.0)]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bandwidth.json: missing l2_bytes"):
        floor.read_inputs([good], hardware)
    hardware.write_text(json.dumps({"gpu": "test GPU", "copy_tbps": 2.0, "l2_bytes": 1}), encoding="utf-8")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"runs": [{**_run("lorakit", "eager", 1.0), "spec": {"layers": 4}}]}))
    with pytest.raises(ValueError, match="2 model specs"):
        floor.read_inputs([good, other], hardware)
    stray = tmp_path / "stray.json"
    stray.write_text("[1, 2]", encoding="utf-8")
    argv = [
        "budget",
        "--throughput",
        str(stray),
        "--hardware",
        str(hardware),
        "--out",
        str(tmp_path / "f.json"),
    ]
    assert floor.main(argv) == 2
    assert "stray.json: not a throughput.py JSON" in caplog.text
    assert not (tmp_path / "f.json").exists()
