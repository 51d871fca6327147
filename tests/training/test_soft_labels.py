"""DeQA-Score's soft-label loss in the trainer, on owl2-tiny: the step's loss equals a hand computation from the
logits, the KL alone reaches the vision tower, batches without soft labels train as before; the qalign recipe."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from owl2.cli.main import main as cli
from owl2.data.quality import quality_records, read_quality_table
from owl2.experiments.quality import make_quality_set
from owl2.experiments.tiny import default_model_dir
from owl2.training.config import RecipeError, load_recipe
from owl2.training.losses import mask_level_words, soft_label_kl
from owl2.training.metrics import read_metrics
from owl2.training.trainer import Trainer, train
from tests.training.conftest import write_recipe

TINY = default_model_dir()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory) -> dict[str, Path]:
    """Eight degraded shapes scenes as Q-Align records, with and without soft labels."""
    root = tmp_path_factory.mktemp("quality")
    tables = make_quality_set(root, train=8, heldout=0)
    items = read_quality_table(tables["train"])
    paths = {}
    for name, soft in (("soft", True), ("plain", False)):
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(quality_records(items, soft_labels=soft)))
    return paths


def _recipe(tmp_path: Path, data: Path, **sections: dict) -> Path:
    model = {"path": str(TINY), "init_config": None, "tokenizer": None}
    train_section = {"batch_size": 4, "grad_accum": 2, "max_steps": 2, **sections.pop("train", {})}
    return write_recipe(tmp_path, TINY, data, model=model, train=train_section,
                        optim={"lr": 1e-3, "warmup_steps": 0}, **sections)


def _copy(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in batch.items()}


def test_step_loss_equals_the_hand_computation(tmp_path, quality_data):
    weights = {"soft_label_weight": 0.7, "ce_weight": 0.05}
    trainer = Trainer(load_recipe(_recipe(tmp_path, quality_data["soft"], loss=weights)))
    micro = [batch for _, _, batch in itertools.islice(trainer.data.iterate(0, 0), 2)]
    assert all(bool((batch["level_positions"] >= 0).all()) for batch in micro)

    ce_sum, targets, kl_sum, soft_rows = 0.0, 0, 0.0, 0
    vocab = trainer.model_config.vocab_size
    with torch.no_grad():
        for batch in micro:
            logits = trainer.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
            labels = batch["labels"].clone()
            for row, position in enumerate(batch["level_positions"].tolist()):
                labels[row, position] = -100  # the level word leaves the cross-entropy
                # DeQA-Score's form: kl_div over the whole vocabulary with the target placed at the level ids
                target = torch.zeros(vocab)
                target[batch["level_ids"][row]] = batch["soft_labels"][row]
                log_q = F.log_softmax(logits[row, position - 1].double(), dim=-1)
                kl_sum += float(F.kl_div(log_q, target.double(), reduction="sum"))
                soft_rows += 1
            ce_sum += float(F.cross_entropy(logits[:, :-1].reshape(-1, vocab).double(), labels[:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="sum"))
            targets += int((labels[:, 1:] != -100).sum())
    expected = 0.05 * ce_sum / targets + 0.7 * kl_sum / soft_rows

    result = trainer.train_step([_copy(batch) for batch in micro])
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["soft_label_kl"] == pytest.approx(kl_sum / soft_rows, rel=1e-5)
    assert result["ce"] == pytest.approx(ce_sum / targets, rel=1e-5)
    assert result["soft_labels"] == soft_rows == 8 and result["targets"] == targets


def test_the_kl_alone_trains_the_whole_model(tmp_path, quality_data):
    """With the cross-entropy weighted 0 only the KL at the level word drives the step, and its gradient reaches
    the level words' output rows, the language model and the vision tower."""
    trainer = Trainer(load_recipe(_recipe(tmp_path, quality_data["soft"], train={"max_steps": 1},
                                          loss={"soft_label_weight": 1.0, "ce_weight": 0.0})))
    batch = next(trainer.data.iterate(0, 0))[2]
    model = trainer.model
    with torch.no_grad():
        before = soft_label_kl(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits,
                               batch["soft_labels"], batch["level_ids"], batch["level_positions"])
    params = dict(model.named_parameters())
    start = {name: param.detach().clone() for name, param in params.items()}
    trainer.train_step([_copy(batch)])
    changed = {name for name, param in params.items() if not torch.equal(param, start[name])}
    level_ids = batch["level_ids"][0]
    head_change = (params["lm_head.weight"] - start["lm_head.weight"]).abs().sum(dim=1)
    assert bool((head_change[level_ids] > 0).all())
    assert any(name.startswith("model.vision_model.") for name in changed)
    assert any(name.startswith("model.visual_abstractor.") for name in changed)
    assert any(name.startswith("model.layers.0.") for name in changed)
    with torch.no_grad():
        after = soft_label_kl(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits,
                              batch["soft_labels"], batch["level_ids"], batch["level_positions"])
    assert float(after) < float(before)  # one step down the KL


def test_batches_without_soft_labels_train_as_before(tmp_path, quality_data):
    def losses(name: str, data: Path, **loss: float) -> list[float]:
        result = train(load_recipe(_recipe(tmp_path / name, data, loss=loss)))
        return result.losses

    reference = losses("plain", quality_data["plain"])
    # the loss on but no soft label in the data, and soft labels in the data but the loss off: the same run
    assert losses("plain-kl-on", quality_data["plain"], soft_label_weight=1.0) == reference
    assert losses("soft-kl-off", quality_data["soft"]) == reference
    assert "soft_label_kl" not in read_metrics(tmp_path / "soft-kl-off" / "run")[0]
    with_kl = losses("soft-kl-on", quality_data["soft"], soft_label_weight=1.0)
    assert with_kl != reference
    assert "soft_label_kl" in read_metrics(tmp_path / "soft-kl-on" / "run")[0]


def test_soft_label_kl_matches_kl_div_and_skips_rows_without_a_label():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=generator)
    soft = torch.tensor([[0.1, 0.6, 0.3], [0.0, 0.0, 0.0], [0.0, 0.25, 0.75]])
    level_ids = torch.tensor([[4, 7, 2], [0, 0, 0], [9, 1, 3]])
    positions = torch.tensor([3, -1, 5])
    expected = 0.0
    for row in (0, 2):
        target = torch.zeros(11)
        target[level_ids[row]] = soft[row]
        expected += float(F.kl_div(F.log_softmax(logits[row, positions[row] - 1], -1), target, reduction="sum"))
    assert float(soft_label_kl(logits, soft, level_ids, positions)) == pytest.approx(expected, rel=1e-6)
    assert float(soft_label_kl(logits, soft, level_ids, torch.full((3,), -1))) == 0.0
    with pytest.raises(ValueError, match="position 0"):
        soft_label_kl(logits, soft, level_ids, torch.tensor([0, -1, -1]))
    labels = torch.arange(18).reshape(3, 6)
    assert mask_level_words(labels, positions).tolist() == [[0, 1, 2, -100, 4, 5], [6, 7, 8, 9, 10, 11],
                                                             [12, 13, 14, 15, 16, -100]]


def test_qalign_recipe_loads_and_validates(tmp_path, capsys):
    config = load_recipe("qalign", ["model.path=./owl2-7b", "data.path=train.json"])
    assert config.stage == "stage2" and config.lora.enabled is False  # a full fine-tune
    assert config.optim.lr == 2e-5 and config.optim.abstractor_lr == 2e-5 and config.optim.weight_decay == 0.0
    assert config.train.epochs == 2.0 and config.train.warmup_ratio == 0.03
    assert config.train.batch_size * config.train.grad_accum == 64
    assert config.data.image_policy == "pad" and config.data.template == "mplug_owl2"
    assert (config.loss.ce_weight, config.loss.soft_label_weight) == (1.0, 0.0)
    assert config.loss.levels == ("excellent", "good", "fair", "poor", "bad")
    deqa = load_recipe("qalign", ["model.path=m", "data.path=d", "loss.soft_label_weight=1.0"])
    assert deqa.loss.soft_label_weight == 1.0
    recorded = tmp_path / "recorded.toml"
    recorded.write_text(deqa.to_toml())
    assert load_recipe(recorded) == deqa
    with pytest.raises(RecipeError, match=re.escape("loss.ce_weight and loss.soft_label_weight must be >= 0")):
        load_recipe("qalign", ["model.path=m", "data.path=d", "loss.ce_weight=0"])
    # `owl2 train qalign` finds the packaged recipe, and says what is missing (the model defaults to owl2-tiny)
    assert cli(["train", "qalign"]) == 2
    assert "data.path is required" in capsys.readouterr().err
