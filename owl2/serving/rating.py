"""``POST /v1/rate``: a rating request becomes one prefill-only row per item, the batcher returns each row's
last-position logits, and the Q-Align read-out (:class:`owl2.rating.RatingScale`) turns them into ratings.

Each item is fetched under the server's :class:`~owl2.serving.images.ImagePolicy` and turned into its row by
:func:`owl2.rating.rating_row`, the function ``Pipeline.rate`` uses, so a rating from the server equals
``pipe.rate`` on the same item. Everything here that touches images is blocking: the app runs :func:`build_job` in
its thread pool, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from owl2.rating import Rating, RatingScale
from owl2.rating.rate import check_fits, rating_row
from owl2.serving.batcher import PrefillRow
from owl2.serving.images import ImagePolicy, fetch_image
from owl2.serving.protocol import RateRequest


class InvalidRating(ValueError):
    """A request the server will not rate (HTTP 400); the message starts with the field at fault."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class RatingJob:
    rows: list[PrefillRow]
    scale: RatingScale
    prompt_tokens: int
    """Positions of all rows, each image or frame counted as its visual tokens."""


def check_limits(body: RateRequest, *, max_items: int, max_frames: int) -> None:
    """The per-request limits, checked before any image is fetched."""
    if len(body.items) > max_items:
        raise InvalidRating(f"items: {len(body.items)} items in one request; the limit is {max_items}", "items",
                            "too_many_items")
    for i, item in enumerate(body.items):
        if item.video is not None and len(item.video) > max_frames:
            raise InvalidRating(f"items[{i}].video: {len(item.video)} frames; the limit is {max_frames} per video",
                                f"items[{i}].video", "too_many_frames")


def build_job(pipeline: Any, body: RateRequest, policy: ImagePolicy, context_length: int) -> RatingJob:
    """Fetch, decode and preprocess every item, render its prompt and check it fits the context (blocking)."""
    try:
        scale = RatingScale(pipeline.tokenizer, body.levels, body.weights)
    except ValueError as exc:
        param = "weights" if "weight" in str(exc) else "levels"
        raise InvalidRating(f"{param}: {exc}", param) from exc
    tokens_per_image = pipeline.model.config.tokens_per_image
    rows: list[PrefillRow] = []
    prompt_tokens = 0
    for i, item in enumerate(body.items):
        if item.image_url is not None:
            source: Any = _fetch(item.image_url.url, policy, f"items[{i}].image_url")
        else:
            assert item.video is not None
            source = [_fetch(frame.url, policy, f"items[{i}].video[{j}]") for j, frame in enumerate(item.video)]
        try:
            row = rating_row(pipeline.tokenizer, pipeline.image_processor, source, task=body.task,
                             prompt=body.prompt, policy=pipeline.policy)
        except ValueError as exc:
            raise InvalidRating(f"items[{i}]: {exc}", f"items[{i}]") from exc
        try:
            prompt_tokens += check_fits(row, tokens_per_image, context_length, f"items[{i}]", "send fewer frames")
        except ValueError as exc:
            raise InvalidRating(str(exc), f"items[{i}]", "context_length_exceeded") from exc
        rows.append(PrefillRow(row.prompt_ids, row.pixels))
    return RatingJob(rows, scale, prompt_tokens)


def _fetch(url: str, policy: ImagePolicy, where: str) -> Any:
    try:
        return fetch_image(url, policy)
    except ValueError as exc:
        raise InvalidRating(f"{where}: {exc}", where, "invalid_image") from exc


def rating_list(model: str, ratings: list[Rating], prompt_tokens: int) -> dict[str, Any]:
    """The response body: OpenAI's list form, as the embeddings endpoint answers."""
    return {"object": "rating.list", "model": model,
            "data": [{"object": "rating", "index": i, **rating.to_dict()} for i, rating in enumerate(ratings)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
