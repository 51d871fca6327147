"""The paper's modality-collaboration ablation (Table 5) at small scale: owl2-tiny with and without the MAM.

Both variants get the same data (one shapes-world training set with text-only instructions, one tokenizer), the
same stage-V vision side (trained once: it does not involve the language model), the same recipe
(``owl2/experiments/recipes/tiny/``), the same number of steps and the same seed; the only difference is
``modality_adaptive`` in the model config (False: text and image positions share the norms and K/V projections).
Both are then scored on the same held-out set: multimodal accuracy (the scene questions) and text-only accuracy
(arithmetic, spelling, ordering, letter counts, reversal), like the paper's VQAv2/Q-Bench versus MMLU/BBH columns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from owl2.experiments.tiny import (
    TINY_CONFIGS,
    TinyBuild,
    evaluate_tiny,
    prepare,
    pretrain_vision_side,
    recipe_steps,
    results_dir,
    train_stages,
)
from owl2.utils import atomic_write_text, pyplot, save_figure

VARIANTS = {"MAM (modality-adaptive norms and K/V)": True, "no MAM (shared norms and K/V)": False}


def _accuracy(breakdown: dict[str, dict[str, float]], types: set[str]) -> float:
    rows = [row for kind, row in breakdown.items() if kind in types]
    total = sum(row["count"] for row in rows)
    return sum(row["accuracy"] * row["count"] for row in rows) / total if total else float("nan")


def run_mam_ablation(workdir: str | os.PathLike[str], *, scenes: int | None = None, steps: int | None = None,
                     build: TinyBuild | None = None, configs: Path = TINY_CONFIGS,
                     mam_build: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Train and score both variants; writes ``report.json``, ``report.md`` and ``report.png`` (with matplotlib)
    under ``workdir``.

    Default budget: 8000 scenes and 3000 text items, stage V of 2000 steps, stages 0/1/2 of 400/30/50 steps
    (``steps`` sets stage 0), scored on 300 held-out scenes and 200 text items. ``build`` sets everything (the
    shipped model's recipe: ``TinyBuild()``). ``mam_build``, the folder of a :func:`~owl2.experiments.tiny.build_tiny`
    run with the same ``build``, is the MAM variant: its data, stage V and model are used as they are, and only the
    no-MAM variant is trained (in ``workdir``)."""
    from owl2.experiments.shapes import TEXT_QUESTION_TYPES
    from owl2.model.config import Owl2Config

    workdir = Path(workdir)
    build = build or TinyBuild(scenes=scenes or 8000, text_items=3000, eval_scenes=300, eval_text_items=200,
                               vision_steps=2000, stage0_steps=steps or 400, stage1_steps=30, stage2_steps=50)
    build = dataclasses.replace(build, stage3_steps=0)  # the paper's stages, as Table 5 compares them
    shared_dir = Path(mam_build) if mam_build is not None else workdir / "shared"
    if mam_build is not None:
        if not (shared_dir / "build.json").is_file():
            raise ValueError(f"{shared_dir} is not the folder of a finished build-tiny run (no build.json)")
        if not Owl2Config.from_json(shared_dir / "init").modality_adaptive:
            raise ValueError(f"{shared_dir} is a build without the MAM (its init/config.json turns it off)")
    shared = prepare(shared_dir, build, configs)
    vision = pretrain_vision_side(shared_dir, shared, build, configs)
    results = {}
    for name, adaptive in VARIANTS.items():
        run_dir = shared_dir if adaptive and mam_build is not None else workdir / ("mam" if adaptive else "no-mam")
        init = run_dir / "init"
        if not (init / "config.json").is_file():
            shutil.copytree(shared["init"], init, dirs_exist_ok=True)
            config = Owl2Config.from_json(init)
            config.modality_adaptive = adaptive
            config.save(init)
        started = time.perf_counter()
        final = train_stages(run_dir, {**shared, "init": init}, build, configs, vision=vision)
        minutes = (time.perf_counter() - started) / 60
        report = evaluate_tiny(final, shared["eval"], results_dir(run_dir, final))  # a reused build's is read back
        breakdown = report["breakdown"]
        text_types = set(TEXT_QUESTION_TYPES)
        results[name] = {
            "multimodal": _accuracy(breakdown, set(breakdown) - text_types),
            "text_only": _accuracy(breakdown, text_types),
            "per_type": {kind: row["accuracy"] for kind, row in breakdown.items()},
            "train_minutes": minutes,
        }
    markdown = ablation_table(results, build, {k: n for k, n in recipe_steps(build, configs).items() if n})
    atomic_write_text(workdir / "report.json", json.dumps({"build": build.__dict__, "results": results}, indent=2))
    atomic_write_text(workdir / "report.md", markdown)
    plot_ablation(results, workdir / "report.png")
    return {"results": results, "markdown": markdown}


def ablation_table(results: dict[str, dict[str, Any]], build: TinyBuild, steps: dict[str, int]) -> str:
    """The Markdown report: one row per variant; ``steps`` are the stages run (:func:`recipe_steps`)."""
    kinds = sorted({k for r in results.values() for k in r["per_type"]})
    head = "| variant | multimodal | text-only | " + " | ".join(kinds) + " |"
    lines = [f"Same data ({build.scenes} scenes, {build.text_items} text items), stage-V vision side, recipe, steps "
             f"(stages {'/'.join(steps)}: {'/'.join(str(n) for n in steps.values())}) and seed; {build.eval_scenes} "
             f"held-out "
             f"scenes and {build.eval_text_items} text items. Accuracy in %.", "", head,
             "|---" * (len(kinds) + 3) + "|"]
    for name, r in results.items():
        cells = " | ".join(f"{r['per_type'].get(k, float('nan')):.1f}" for k in kinds)
        lines.append(f"| {name} | {r['multimodal']:.1f} | {r['text_only']:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_ablation(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """Side-by-side bars per question type (and the multimodal and text-only totals), one colour per variant;
    False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    kinds = ["multimodal", "text_only", *sorted({k for r in results.values() for k in r["per_type"]})]
    height = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(kinds) + 1.2), dpi=100)
    for offset, (name, r) in enumerate(results.items()):
        values = [r[k] if k in ("multimodal", "text_only") else r["per_type"].get(k, 0.0) for k in kinds]
        rows = [i + (offset - (len(results) - 1) / 2) * height for i in range(len(kinds))]
        ax.barh(rows, values, height=height, label=name)
        for row, value in zip(rows, values, strict=True):
            ax.text(value, row, f" {value:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(len(kinds)), [k.replace("_", " ") for k in kinds])
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)")
    ax.set_title("MAM ablation")
    ax.set_xlim(0, 110)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08 - 0.6 / len(kinds)), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
    return True
