"""The lmms-eval plugin: discovery by name, generation and log-likelihoods equal to the pipeline's own results.

The model is a tiny random-init checkpoint with the real LLaMA-2 tokenizer and 28 px images (9 positions per image),
so prompts tokenize as with the released model and everything runs in seconds on the CPU.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model

import owl2
from owl2.generation import GenerationRequest, SamplingParams
from owl2.integrations.lmms_eval import Owl2LMMS
from owl2.processing.conversation import render_conversation
from tests.evaluation.conftest import write_tiny_checkpoint

TASK, SPLIT = "toy", "test"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("owl2-lmms-tiny"))


@pytest.fixture(scope="module")
def pipe(checkpoint: Path) -> owl2.Pipeline:
    return owl2.load(checkpoint, dtype="float32", device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    red = Image.new("RGB", (40, 28), (220, 30, 30))
    blue = Image.new("RGB", (28, 36), (40, 60, 220))
    gradient = Image.linear_gradient("L").convert("RGB").resize((30, 30))
    return [
        {"images": [red]},
        {"images": []},
        {"images": [blue, gradient]},
        {"images": None},
        {"images": [gradient]},
    ]


@pytest.fixture(scope="module")
def lm(checkpoint: Path, docs: list[dict[str, Any]]) -> Owl2LMMS:
    """Built the way ``lmms-eval --model owl2 --model_args ... --batch_size 2`` builds it."""
    cls = get_model("owl2")
    model = cls.create_from_arg_string(
        f"pretrained={checkpoint},dtype=float32,device=cpu,max_new_tokens=7",
        {"batch_size": "2", "max_batch_size": None, "device": None},
    )
    model.task_dict = {TASK: {SPLIT: docs}}  # what lmms-eval's evaluator does before sending requests
    return model


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image] | None:
    return doc["images"]


def instance(request_type: str, arguments: tuple[Any, ...], doc_id: int, idx: int = 0) -> Instance:
    return Instance(request_type=request_type, arguments=arguments, idx=idx,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def gen_instance(context: str, doc_id: int, **gen_kwargs: Any) -> Instance:
    return instance("generate_until", (context, gen_kwargs, doc_to_visual, doc_id, TASK, SPLIT), doc_id)


def ll_instance(context: str, continuation: str, doc_id: int, idx: int = 0) -> Instance:
    return instance("loglikelihood", (context, continuation, doc_to_visual, doc_id, TASK, SPLIT), doc_id, idx)


def images_of(docs: list[dict[str, Any]], doc_id: int) -> list[Image.Image]:
    return list(docs[doc_id]["images"] or [])


# ------------------------------------------------------------------------------------------------------- discovery
def test_discovered_by_name_and_built_from_model_args(lm: Owl2LMMS, checkpoint: Path) -> None:
    from lmms_eval.models import get_model_manifest

    assert get_model("owl2") is Owl2LMMS
    assert get_model("mplug_owl2") is Owl2LMMS  # the alias
    assert get_model_manifest("owl2").simple_class_path == "owl2.integrations.lmms_eval.Owl2LMMS"
    assert isinstance(lm, Owl2LMMS)
    assert lm.batch_size == 2 and lm.max_new_tokens == 7
    assert lm.device == torch.device("cpu") and lm.model.dtype == torch.float32
    assert (lm.rank, lm.world_size) == (0, 1)


def test_rejects_unknown_model_args(checkpoint: Path) -> None:
    with pytest.raises(TypeError, match="dtpye"):
        Owl2LMMS.create_from_arg_string(f"pretrained={checkpoint},dtpye=float32")


def test_clean_releases_the_model(checkpoint: Path) -> None:
    model = Owl2LMMS(pretrained=str(checkpoint), dtype="float32", device="cpu")
    module = weakref.ref(model.model)
    model.clean()
    gc.collect()
    assert module() is None  # nothing else keeps the weights alive for the LLM judge to compete with


# ------------------------------------------------------------------------------------------------------ generation
def test_generate_until_equals_pipeline(lm: Owl2LMMS, pipe: owl2.Pipeline, docs: list[dict[str, Any]]) -> None:
    cases = [  # (context, doc_id, gen_kwargs)
        ("What colour is this picture?", 0, {"max_new_tokens": 5, "until": ["\n\n"]}),
        ("Say something.", 1, {"until": "ASSISTANT"}),  # the model's default max_new_tokens (7)
        ("Compare the two images and describe the differences between them in detail, please.", 2,
         {"max_new_tokens": 9, "temperature": 0, "top_p": 0, "num_beams": 1, "do_sample": False}),
        ("Hi", 3, {"max_new_tokens": 3}),
        ("First <image> then a question about it?", 4, {"max_new_tokens": 6, "image_aspect_ratio": "pad"}),
    ]
    answers = lm.generate_until([gen_instance(ctx, doc_id, **kw) for ctx, doc_id, kw in cases])

    expected = []
    for context, doc_id, kwargs in cases:
        until = kwargs.get("until", [])
        stop = [until] if isinstance(until, str) else until
        sampling = {"max_new_tokens": kwargs.get("max_new_tokens", 7), "stop": stop}
        images = images_of(docs, doc_id)
        if "<image>" in context:  # the placeholder stays where the task put it
            text = render_conversation([{"role": "user", "content": context.replace("<image>", "<|image|>")}],
                                       images=images)
            request = GenerationRequest(pipe.tokenizer.encode_prompt(text), pipe.pixels(images),
                                        SamplingParams(**{**sampling, "stop": (*stop, "</s>")}))
            expected.append(pipe.engine.generate([request])[0].text)
        else:  # each request alone: batching and reordering must not change a greedy answer
            expected.append(pipe.generate([context], [images], **sampling)[0].text)
    assert answers == expected
    assert any(a for a in answers)


def test_images_go_before_the_text(lm: Owl2LMMS, docs: list[dict[str, Any]]) -> None:
    assert lm.render("Describe.", images_of(docs, 2)) == "USER: <|image|><|image|>Describe. ASSISTANT:"
    assert lm.render("Describe.", []) == "USER: Describe. ASSISTANT:"
    assert lm.render("A <image> B", images_of(docs, 0)) == "USER: A <|image|> B ASSISTANT:"
    with pytest.raises(ValueError, match="placeholder"):
        lm.render("<image><image> two?", images_of(docs, 0))


def test_beam_search_is_refused(lm: Owl2LMMS) -> None:
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([gen_instance("Hi", 1, num_beams=3)])
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([])


# ------------------------------------------------------------------------------------------------------ likelihood
def direct_scores(pipe: owl2.Pipeline, prompt_ids: list[int], cont: list[int],
                  images: list[Image.Image]) -> tuple[float, bool]:
    """Summed log-probability of ``cont`` after ``prompt_ids``, and whether each token is the argmax, from one plain
    forward of the concatenated ids."""
    ids = torch.tensor([prompt_ids + cont])
    batch = owl2.prepare_official_inputs(ids, pixel_values=pipe.pixels(images), config=pipe.model.config)
    with torch.no_grad():
        logprobs = pipe.model(**batch).logits[0].float().log_softmax(-1)
    predicting = logprobs[-len(cont) - 1:-1]  # the positions that predict each continuation token
    target = torch.tensor(cont)
    total = float(predicting.gather(-1, target[:, None]).sum())
    return total, bool((predicting.argmax(-1) == target).all())


def split_ids(pipe: owl2.Pipeline, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    context = pipe.tokenizer.encode_prompt(prompt)
    whole = pipe.tokenizer.encode_prompt(prompt + continuation)
    assert whole[:len(context)] == context  # the boundary does not merge tokens for these cases
    return context, whole[len(context):]


def test_loglikelihood_equals_direct_forward(lm: Owl2LMMS, pipe: owl2.Pipeline,
                                             docs: list[dict[str, Any]]) -> None:
    question = "What is in the picture?"
    images = images_of(docs, 0)
    prompt = lm.render(question, images)
    # the model's own greedy continuation, as text whose tokens after the prompt are exactly those greedy ids
    prompt_ids = pipe.tokenizer.encode_prompt(prompt)
    decoded = pipe.engine.generate([GenerationRequest(prompt_ids, pipe.pixels(images),
                                                      SamplingParams(max_new_tokens=3, stop_token_ids=()))])[0]
    greedy_text = pipe.tokenizer.decode(decoded.token_ids)
    assert split_ids(pipe, prompt, greedy_text)[1] == decoded.token_ids

    text_prompt = lm.render("Name a fruit.", [])
    cases = [  # (context, continuation, doc_id, prompt string, images)
        (question, greedy_text, 0, prompt, images),
        (question, " a red square", 0, prompt, images),
        ("Name a fruit.", " apple", 1, text_prompt, []),
        ("Compare them.", " Yes", 2, lm.render("Compare them.", images_of(docs, 2)), images_of(docs, 2)),
        (question, greedy_text[:1] or greedy_text, 0, prompt, images),
    ]
    requests = [ll_instance(ctx, cont, doc_id, idx) for idx, (ctx, cont, doc_id, _, _) in enumerate(cases)]
    results = lm.loglikelihood(requests)

    assert len(results) == len(cases)
    for (_, cont, _, prompt_text, imgs), (logprob, is_greedy) in zip(cases, results, strict=True):
        want_logprob, want_greedy = direct_scores(pipe, *split_ids(pipe, prompt_text, cont), imgs)
        assert logprob == pytest.approx(want_logprob, abs=1e-4)
        assert is_greedy == want_greedy
    assert results[0][1] is True  # built from the model's own greedy tokens
    assert results[1][1] is False  # not what this random model says
    assert all(lp < 0 for lp, _ in results)


def test_loglikelihood_callable_target_and_unconditional(lm: Owl2LMMS, pipe: owl2.Pipeline,
                                                         docs: list[dict[str, Any]]) -> None:
    """lmms-eval's ``loglikelihood`` tasks pass ``doc_to_target``; ``acc_mutual_info`` passes ("", choice)."""
    with_target = instance("loglikelihood", ("Name a fruit.", lambda doc: " apple", doc_to_visual, 1, TASK, SPLIT), 1)
    unconditional = instance("loglikelihood", ("", " apple"), 1)
    (cond, _), (uncond, _) = lm.loglikelihood([with_target, unconditional])

    want_cond, _ = direct_scores(pipe, *split_ids(pipe, lm.render("Name a fruit.", []), " apple"), [])
    whole = pipe.tokenizer.encode_prompt(" apple")  # BOS, then the choice's tokens
    want_uncond, _ = direct_scores(pipe, whole[:1], whole[1:], [])
    assert cond == pytest.approx(want_cond, abs=1e-4)
    assert uncond == pytest.approx(want_uncond, abs=1e-4)
