"""mPLUG-Owl2 through transformers (owl2.integrations.transformers): config, loading, forward and generate.

The transformers class must load every layout owl2 loads (the official pickled shards and safetensors, a Q-Align
checkpoint, owl2's own) with no remote code, give the official fixtures' logits and the same greedy tokens as owl2,
and work with generate's strategies, save_pretrained, peft and streamers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
)

import owl2  # noqa: E402
from owl2.checkpoint.io import RECOMPUTED_KEYS  # noqa: E402
from owl2.integrations.transformers import (  # noqa: E402
    MPLUGOwl2Config,
    MPLUGOwl2LlamaForCausalLM,
    Owl2Cache,
)
from owl2.integrations.transformers import cache as cache_module  # noqa: E402
from owl2.integrations.transformers.modeling import CACHE_FIELD  # noqa: E402
from owl2.model.config import ConfigError, Owl2Config  # noqa: E402
from tests.checkpoint.test_io import official_state, write_official_layout  # noqa: E402
from tests.conftest import FIXTURES, OFFICIAL_TINY, left_pad, max_abs, official  # noqa: E402
from tests.model.test_layout_7b import official_7b_entries  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QALIGN = FIXTURES / "qalign" / "checkpoint"
QALIGN_OUTPUTS = np.load(FIXTURES / "qalign" / "qalign_outputs.npz")
FP32_TOL = 1e-4
LOGIT_CASES = {
    "logits_image": lambda o: official(o["input_ids_image"], pixel_values=o["image"]),
    "logits_text": lambda o: official(o["input_ids_text"]),
    "logits_two_images": lambda o: official(o["input_ids_two_images"], pixel_values=o["images_two"]),
    "logits_batch": lambda o: official(o["input_ids_batch"], pixel_values=o["images_batch"]),
}


@pytest.fixture(scope="module")
def hf_tiny() -> MPLUGOwl2LlamaForCausalLM:
    return AutoModelForImageTextToText.from_pretrained(OFFICIAL_TINY, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_qalign() -> MPLUGOwl2LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(QALIGN, dtype=torch.float32, device_map="auto").eval()


@pytest.fixture(scope="module")
def owl2_qalign() -> owl2.Owl2ForCausalLM:
    return owl2.load_model(QALIGN, dtype=torch.float32, show_progress=False)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def qalign_case(name: str) -> dict[str, torch.Tensor]:
    """The official ids of a recorded Q-Align case with its image, in owl2's expanded layout."""
    ids = torch.from_numpy(QALIGN_OUTPUTS[f"{name}__input_ids"]).long()[None]
    image = name.split("_scorer")[0].removeprefix("img_")
    pixels = torch.from_numpy(QALIGN_OUTPUTS[f"pixel_values__{image}"]).float()[None]
    return owl2.prepare_official_inputs(ids, pixel_values=pixels, config=Owl2Config.from_json(QALIGN))


def new_tokens(sequences: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return sequences[:, batch["input_ids"].shape[1]:]


# ------------------------------------------------------------------------------------------------------- config
def test_config_reads_and_writes_the_official_file_as_is(tmp_path):
    for source in (OFFICIAL_TINY, QALIGN):
        config = AutoConfig.from_pretrained(source)
        assert type(config) is MPLUGOwl2Config and config.model_type == "mplug_owl2"
        config.save_pretrained(tmp_path / source.name)
        # owl2 reads the written file as the config says, and as it reads the original
        assert config.to_owl2() == Owl2Config.from_json(tmp_path / source.name)
        assert dataclasses.replace(config.to_owl2(), extra={}) == dataclasses.replace(Owl2Config.from_json(source),
                                                                                      extra={})
        original = json.loads((source / "config.json").read_text())
        written = json.loads((tmp_path / source.name / "config.json").read_text())
        assert set(written) == set(original)  # nothing lost, nothing added
        assert {k: v for k, v in written.items() if k != "transformers_version"} == \
            {k: v for k, v in original.items() if k != "transformers_version"}
    qalign = AutoConfig.from_pretrained(QALIGN)
    # transformers rebuilds configs from their dictionaries (copies, from_dict): nothing changes on the way
    assert MPLUGOwl2Config(**qalign.to_dict()).to_dict() == qalign.to_dict()
    assert qalign.image_aspect_ratio == "pad" and qalign.tune_visual_abstractor is True  # Q-Align's own keys kept
    assert qalign.tokens_per_image == 17 and qalign.image_token_index == 32000


def test_config_converts_to_and_from_owl2():
    owl2_config = Owl2Config.from_json(OFFICIAL_TINY)
    config = MPLUGOwl2Config.from_owl2(owl2_config)
    # transformers writes its own version over the file's; every other key comes back
    assert dataclasses.replace(config.to_owl2(), extra={}) == dataclasses.replace(owl2_config, extra={})
    assert config.to_owl2().extra["torch_dtype"] == "float32"
    assert config.hidden_size == 64 and config.visual_config["visual_abstractor"]["num_learnable_queries"] == 8
    config.num_hidden_layers = 3  # attributes stay the source of truth
    assert config.to_owl2().num_hidden_layers == 3
    ablation = MPLUGOwl2Config.from_owl2(Owl2Config.from_dict({**owl2_config.to_dict(), "modality_adaptive": False,
                                                               "image_token_id": 400}))
    assert ablation.to_dict()["modality_adaptive"] is False and ablation.image_token_index == 400
    assert "modality_adaptive" not in config.to_dict() and "image_token_id" not in config.to_dict()
    with pytest.raises(ConfigError, match="hidden_size"):
        MPLUGOwl2Config(hidden_size=66, num_attention_heads=4)


def test_parameter_names_are_the_official_7b_keys():
    with torch.device("meta"):
        model = MPLUGOwl2LlamaForCausalLM(MPLUGOwl2Config())
    official_keys = official_7b_entries()
    params = {k: shape for k, (shape, kind) in official_keys.items() if kind == "param"}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == params
    assert all(RECOMPUTED_KEYS.search(k) for k, (_, kind) in official_keys.items() if kind == "buffer")


# ------------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("case", sorted(LOGIT_CASES))
@torch.no_grad()
def test_logits_equal_the_official_fixture_and_owl2(hf_tiny, tiny_fp32, oracle, case):
    batch = LOGIT_CASES[case](oracle)
    out = hf_tiny(**batch)
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
    assert out.logits.shape == oracle[case].shape
    assert max_abs(out.logits, oracle[case]) < FP32_TOL
    assert torch.equal(out.logits, tiny_fp32(**batch).logits)


@torch.no_grad()
def test_loss_and_hidden_states(hf_tiny, oracle):
    ids = oracle["input_ids_image"]
    out = hf_tiny(**official(ids, pixel_values=oracle["image"], labels=ids), output_hidden_states=True)
    assert out.loss.item() == pytest.approx(oracle["loss_image"].item(), abs=1e-5)
    for ours, theirs in zip(out.hidden_states, oracle["hidden_states_image"], strict=True):
        assert max_abs(ours, theirs) < FP32_TOL


@torch.no_grad()
def test_official_pickled_shards_load_with_dtype(tmp_path, oracle):
    directory = write_official_layout(tmp_path / "official", official_state())
    model, info = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert isinstance(model, MPLUGOwl2LlamaForCausalLM)
    # every weight read, and the stored RoPE and sin-cos tables (recomputed) accepted without a word
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = owl2.load_model(directory, dtype=torch.float32, show_progress=False)
    assert_same_state(model, reference)
    batch = official(oracle["input_ids_image"], pixel_values=oracle["image"])
    assert torch.equal(model(**batch).logits, reference(**batch).logits)
    # The derived tables are recomputed in float32 whatever the weights' dtype, as owl2's loader leaves them.
    bf16 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map="cpu")
    assert bf16.dtype == torch.bfloat16 and bf16.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(bf16.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    owl2_bf16 = owl2.load_model(directory, dtype=torch.bfloat16, show_progress=False)
    assert torch.equal(bf16(**batch).logits, owl2_bf16(**batch).logits)


@torch.no_grad()
def test_qalign_checkpoint_gives_the_recorded_logits(hf_qalign, owl2_qalign):
    assert isinstance(hf_qalign, MPLUGOwl2LlamaForCausalLM)
    assert_same_state(hf_qalign, owl2_qalign)
    name = "img_chelsea_square_scorer_quality"
    batch = qalign_case(name)
    logits = hf_qalign(**batch).logits[0, -1]
    np.testing.assert_allclose(logits.numpy(), QALIGN_OUTPUTS[f"{name}__logits_full"], rtol=0, atol=3e-4)
    level_ids = json.loads((FIXTURES / "qalign" / "cases.json").read_text())["level_ids"]
    np.testing.assert_allclose(logits[level_ids].numpy(), QALIGN_OUTPUTS[f"{name}__logits5"], rtol=0, atol=FP32_TOL)
    assert torch.equal(logits, owl2_qalign(**batch).logits[0, -1])


def test_registered_classes_win_over_a_configs_remote_code(tmp_path):
    """Q-Align's released config.json maps the Auto classes to modelling files of its repo; without
    trust_remote_code (and even with it) the registered owl2 classes load it, and no file of the repo is run."""
    directory = tmp_path / "q-align"
    shutil.copytree(QALIGN, directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_mplug_owl2.MPLUGOwl2Config",
                          "AutoModel": "modeling_mplug_owl2.MPLUGOwl2LlamaForCausalLM",
                          "AutoModelForCausalLM": "modeling_mplug_owl2.MPLUGOwl2LlamaForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    # Remote code that would refuse to run: if transformers imported it, loading would fail.
    (directory / "modeling_mplug_owl2.py").write_text("raise RuntimeError('remote code ran')\n")
    (directory / "configuration_mplug_owl2.py").write_text("raise RuntimeError('remote code ran')\n")
    assert type(AutoConfig.from_pretrained(directory)) is MPLUGOwl2Config
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert type(model) is MPLUGOwl2LlamaForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)) is MPLUGOwl2LlamaForCausalLM


@torch.no_grad()
def test_owl2_layout_and_save_pretrained_round_trip(tmp_path, tiny_fp32, hf_tiny, oracle):
    owl2.save_model(tiny_fp32, tmp_path / "owl2", max_shard_size="100KB")
    from_owl2 = AutoModelForImageTextToText.from_pretrained(tmp_path / "owl2", dtype=torch.float32)
    assert_same_state(from_owl2, tiny_fp32)

    hf_tiny.save_pretrained(tmp_path / "hf")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert_same_state(again, hf_tiny)
    assert again.config.to_owl2() == hf_tiny.config.to_owl2()
    # owl2 reads what transformers wrote, and the official config keys are all there.
    assert_same_state(owl2.load_model(tmp_path / "hf", show_progress=False), hf_tiny)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert set(json.loads((OFFICIAL_TINY / "config.json").read_text())) <= set(written)
    batch = official(oracle["input_ids_two_images"], pixel_values=oracle["images_two"])
    assert torch.equal(again(**batch).logits, hf_tiny(**batch).logits)


# --------------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def test_greedy_generate_equals_the_fixture_and_owl2(hf_tiny, tiny_fp32, oracle):
    batch = official(oracle["input_ids_image"], pixel_values=oracle["image"])
    out = hf_tiny.generate(**batch, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                           output_scores=True)
    assert torch.equal(new_tokens(out.sequences, batch), oracle["generate_new_tokens"])
    assert max_abs(torch.stack(out.scores, 1), oracle["generate_scores"]) < FP32_TOL
    no_cache = hf_tiny.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(new_tokens(no_cache, batch), oracle["generate_new_tokens_nocache"])


@torch.no_grad()
def test_greedy_left_padded_mixed_batch_and_two_images(hf_tiny, tiny_fp32, oracle):
    # a left-padded batch of an image row and a text row
    rows = [oracle["input_ids_image"][0], oracle["input_ids_text"][0]]
    ids, mask = left_pad(rows)
    batch = official(ids, mask, pixel_values=oracle["image"])
    hf = new_tokens(hf_tiny.generate(**batch, max_new_tokens=8, do_sample=False), batch)
    assert torch.equal(hf, tiny_fp32.generate(**batch, max_new_tokens=8))
    for row, alone in zip(rows, hf, strict=True):  # each row answers as it would alone
        single = official(row[None], pixel_values=oracle["image"] if (row == -200).any() else None)
        assert torch.equal(alone, tiny_fp32.generate(**single, max_new_tokens=8)[0])
    # the recorded left-padded batch (two images), whose rows-alone answers the fixture holds
    batch = official(oracle["input_ids_leftpad"], oracle["attention_mask_leftpad"], pixel_values=oracle["images_batch"])
    hf = new_tokens(hf_tiny.generate(**batch, max_new_tokens=8, do_sample=False), batch)
    assert torch.equal(hf, oracle["generate_leftpad_rows_alone_new_tokens"])
    # one prompt with two images
    batch = official(oracle["input_ids_two_images"], pixel_values=oracle["images_two"])
    hf = new_tokens(hf_tiny.generate(**batch, max_new_tokens=8, do_sample=False), batch)
    assert torch.equal(hf, tiny_fp32.generate(**batch, max_new_tokens=8))


@torch.no_grad()
def test_forward_returns_an_owl2_cache_that_continues(hf_tiny, oracle):
    batch = official(oracle["input_ids_image"], pixel_values=oracle["image"])
    out = hf_tiny(**batch, use_cache=True)
    cache = getattr(out, CACHE_FIELD)
    assert isinstance(cache, Owl2Cache) and cache.get_seq_length() == batch["input_ids"].shape[1]
    # one step on the cache (a text token: the cached image positions keep their branch) equals the whole sequence
    step = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], 1)
    stepped = hf_tiny(input_ids=step, attention_mask=mask, past_key_values=cache).logits[:, -1]
    whole = hf_tiny(input_ids=torch.cat([batch["input_ids"], step], 1), attention_mask=mask,
                    pixel_values=oracle["image"], use_cache=False).logits[:, -1]
    assert max_abs(stepped, whole) < 1e-5
    assert isinstance(hf_tiny(**batch, return_dict=False), tuple)


@torch.no_grad()
def test_generate_through_a_cache_that_grows(hf_tiny, oracle, monkeypatch):
    # room for only two positions at a time: the cache is reallocated several times during the answer
    monkeypatch.setattr(cache_module, "GROWTH_STEP", 2)
    batch = official(oracle["input_ids_image"], pixel_values=oracle["image"])
    out = hf_tiny.generate(**batch, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(new_tokens(out.sequences, batch), oracle["generate_new_tokens"])
    cache = getattr(out, CACHE_FIELD)
    assert cache.get_seq_length() == batch["input_ids"].shape[1] + 7 and cache.max_cache_len < 64


@torch.no_grad()
def test_sampling_with_a_seed_repeats(hf_tiny, oracle):
    batch = official(oracle["input_ids_batch"], pixel_values=oracle["images_batch"])
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(hf_tiny.generate(**batch, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50))
    assert runs[0].shape == (2, batch["input_ids"].shape[1] + 6)
    assert torch.equal(runs[0], runs[1])
    assert ((new_tokens(runs[0], batch) >= 0) & (new_tokens(runs[0], batch) < 320)).all()


def reference_beam_search(model: owl2.Owl2ForCausalLM, batch: dict[str, torch.Tensor], beams: int,
                          steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search by hand over owl2's model, recomputing every prefix: keep the ``beams`` best continuations by
    summed log-probability at each step. Returns the ``beams`` final hypotheses [beams, steps], best first, and
    their summed log-probabilities [beams] (no end token may be reached)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hypotheses = [([], 0.0)]
    for _ in range(steps):
        candidates = []
        for tokens, score in hypotheses:
            extra = torch.tensor([tokens], dtype=torch.long)
            logits = model(torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1),
                           batch.get("pixel_values")).logits[0, -1]
            top = torch.log_softmax(logits.float(), -1).topk(beams)
            candidates += [([*tokens, int(t)], score + float(v)) for v, t in zip(top.values, top.indices, strict=True)]
        hypotheses = sorted(candidates, key=lambda c: -c[1])[:beams]
    assert all(model.config.eos_token_id not in tokens for tokens, _ in hypotheses)
    return torch.tensor([tokens for tokens, _ in hypotheses]), torch.tensor([score for _, score in hypotheses])


def assert_beams_equal(model, batch, reference: owl2.Owl2ForCausalLM, steps: int) -> None:
    """generate's two beams per row (num_return_sequences=2) and their scores equal the hand search, row by row.
    The scores tell a wrong image or a cache row that was not reordered even when the best sequence survives."""
    out = model.generate(**batch, max_new_tokens=steps, num_beams=2, num_return_sequences=2, do_sample=False,
                         length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    rows = batch["input_ids"].shape[0]
    assert out.sequences.shape == (2 * rows, batch["input_ids"].shape[1] + steps)
    images = batch.get("pixel_values")
    per_row = (batch["input_ids"] == reference.config.image_token_index).sum(-1) // reference.config.tokens_per_image
    first = torch.cumsum(per_row, 0) - per_row
    for row in range(rows):
        single = {"input_ids": batch["input_ids"][row:row + 1], "attention_mask": batch["attention_mask"][row:row + 1]}
        if images is not None and per_row[row] > 0:
            single["pixel_values"] = images[first[row]:first[row] + per_row[row]]
        tokens, scores = reference_beam_search(reference, single, beams=2, steps=steps)
        assert torch.equal(new_tokens(out.sequences, batch)[2 * row:2 * row + 2], tokens)
        assert max_abs(out.sequences_scores[2 * row:2 * row + 2], scores) < 1e-4


@torch.no_grad()
def test_beam_search_equals_a_hand_search(hf_tiny, tiny_fp32, oracle):
    # two images in one prompt: the expansion must give each beam the row's two images in order
    assert_beams_equal(hf_tiny, official(oracle["input_ids_two_images"], pixel_values=oracle["images_two"]),
                       tiny_fp32, steps=5)
    # a left-padded batch of an image row and a text row, then the recorded batch of two image rows
    ids, mask = left_pad([oracle["input_ids_image"][0], oracle["input_ids_text"][0]])
    assert_beams_equal(hf_tiny, official(ids, mask, pixel_values=oracle["image"]), tiny_fp32, steps=4)


@torch.no_grad()
def test_cache_reorder_and_crop(hf_tiny, tiny_fp32, oracle):
    """Beam search's row reordering and assisted decoding's cropping, checked on the logits they lead to."""
    ids, mask = left_pad([oracle["input_ids_image"][0], oracle["input_ids_text"][0]])
    batch = official(ids, mask, pixel_values=oracle["image"])
    cache = Owl2Cache()
    hf_tiny(**batch, past_key_values=cache)
    step = torch.tensor([[5], [9]])
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], 1)
    cache.reorder_cache(torch.tensor([1, 1]))  # both rows now hold row 1's history
    both = hf_tiny(input_ids=step, attention_mask=full_mask[[1, 1]], past_key_values=cache).logits[:, -1]
    for i, token in enumerate((5, 9)):
        expected = tiny_fp32(torch.cat([oracle["input_ids_text"], torch.tensor([[token]])], 1)).logits[0, -1]
        assert max_abs(both[i], expected) < 1e-5  # row 1 alone, then each token
    # crop the step away and take another: the same as taking it in the first place
    cache.crop(-1)
    assert cache.get_seq_length() == batch["input_ids"].shape[1]
    again = hf_tiny(input_ids=torch.tensor([[9], [5]]), attention_mask=full_mask[[1, 1]],
                    past_key_values=cache).logits[:, -1]
    assert max_abs(again, both.flip(0)) < 1e-5


@torch.no_grad()
def test_stop_strings_and_streamer(hf_qalign, owl2_qalign):
    from transformers import PreTrainedTokenizerFast, TextIteratorStreamer

    tokenizer = owl2.load_tokenizer(QALIGN)
    batch = qalign_case("img_chelsea_square_scorer_quality")
    greedy = owl2_qalign.generate(**batch, max_new_tokens=10)[0]
    assert torch.equal(new_tokens(hf_qalign.generate(**batch, max_new_tokens=10, do_sample=False), batch)[0],
                       greedy)

    # the streamer concatenates to the decoded answer
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    worker = threading.Thread(target=lambda: hf_qalign.generate(**batch, max_new_tokens=10, do_sample=False,
                                                                streamer=streamer))
    worker.start()
    text = "".join(streamer)
    worker.join(timeout=60)
    assert text == tokenizer.decode(greedy.tolist())

    # a stop string met at the 4th new token ends generation there
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(QALIGN / "tokenizer.json"))
    stop = tokenizer.decode(greedy[:4].tolist())[-3:]
    assert stop not in tokenizer.decode(greedy[:3].tolist())
    out = hf_qalign.generate(**batch, max_new_tokens=10, do_sample=False, stop_strings=[stop],
                             tokenizer=hf_tokenizer)
    assert torch.equal(new_tokens(out, batch)[0], greedy[:4])


def test_peft_lora_forward_and_backward(oracle):
    peft = pytest.importorskip("peft")
    ids = oracle["input_ids_image"]
    batch = official(ids, pixel_values=oracle["image"], labels=ids)
    grads = {}
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(OFFICIAL_TINY, dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.gradient_checkpointing
        torch.manual_seed(0)  # the same random LoRA weights in both runs
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                          init_lora_weights=False))
        trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in name for name in trainable)
        lora.train()
        out = lora(**batch)
        out.loss.backward()
        grads[checkpointing] = {name: p.grad for name, p in lora.named_parameters() if p.requires_grad}
        assert all(g is not None and g.abs().sum() > 0 for g in grads[checkpointing].values())
    # recomputing the activations changes no gradient
    for name, grad in grads[False].items():
        assert torch.allclose(grad, grads[True][name], atol=1e-6), name


def test_a_model_built_from_a_config_is_initialised():
    config = AutoConfig.from_pretrained(OFFICIAL_TINY)
    torch.manual_seed(0)
    model = MPLUGOwl2LlamaForCausalLM(config)
    reference = owl2.load_model(OFFICIAL_TINY, show_progress=False)
    for name, buffer in model.named_buffers():  # the derived tables, computed as owl2 computes them
        assert torch.equal(buffer, reference.get_buffer(name)), name
    params = dict(model.named_parameters())
    assert params["model.vision_model.embeddings.cls_token"].std() > 0
    assert torch.equal(params["model.norm.weight"], torch.ones(64))
    assert 0.01 < params["model.layers.0.self_attn.q_proj.weight"].std() < 0.03  # N(0, initializer_range 0.02)
