"""Captioning on the Karpathy test splits: COCO (trained on in stage 2) and Flickr30K (zero-shot).

Prompt (``evaluate_caption.py``): ``USER: <|image|>Provide a one-sentence caption for the provided image.
ASSISTANT: ``, greedy, 8 to 60 new tokens (``length_penalty=0`` in the official call only matters for beam search).
Metrics: BLEU-1..4, ROUGE-L and CIDEr-D as pycocoevalcap computes them (METEOR and SPICE need Java and downloads).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from owl2.evaluation.metrics import caption_scores
from owl2.evaluation.tasks.base import Sample, Task, TaskReport, first_file, register
from owl2.processing.conversation import CAPTION_INSTRUCTION, evaluation_prompt


def _karpathy_image(root: Path, entry: dict[str, Any]) -> Path:
    name = entry["filename"]
    return first_file((root / entry.get("filepath", "") / name, root / "images" / name, root / name),
                      f"Karpathy-split image {name}")


@register("coco_caption", "flickr30k")
class CaptionTask(Task):
    max_new_tokens = 60
    min_new_tokens = 8
    data_format = ("Karpathy's dataset_coco.json / dataset_flickr30k.json ({images: [{filename, filepath?, split, "
                   "sentences: [{raw}]}]}); the test split is used; images under filepath/, images/ or beside it")

    def load(self, data: Path) -> list[Sample]:
        entries = json.loads(data.read_text(encoding="utf-8"))["images"]
        root = data.parent
        return [Sample(str(e.get("cocoid", e.get("imgid", e["filename"]))), evaluation_prompt(CAPTION_INSTRUCTION),
                       [_karpathy_image(root, e)], [s["raw"] for s in e["sentences"]])
                for e in entries if e.get("split") == "test"]

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        scores = caption_scores({s.id: predictions[s.id]["prediction"] for s in samples},
                                {s.id: list(s.answer) for s in samples})
        return TaskReport({k: 100 * v for k, v in scores.items()})
