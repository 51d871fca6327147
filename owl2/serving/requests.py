"""Request mapping: an OpenAI chat request -> owl2's messages, sampling parameters and generation requests
(:func:`build_generation_requests`), and a step's log-probabilities -> OpenAI's logprob entry."""

import dataclasses
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from owl2.generation.engine import GenerationRequest, StepEvent
from owl2.serving.errors import APIError, clip, shown
from owl2.serving.images import TooManyDownloads, fetch_image
from owl2.serving.protocol import ChatCompletionRequest, token_logprob

if TYPE_CHECKING:
    from owl2.serving.app import ServerSettings


def check_model(requested: str | None, served: str) -> None:
    """404 when a request names a model other than the ``served`` one (naming none is fine)."""
    if requested is not None and requested != served:
        raise APIError(404, f"the model {clip(requested)!r} does not exist; this server serves "
                       f"{served!r}", param="model", code="model_not_found")


def chat_messages(body: ChatCompletionRequest, images: list[Any]) -> list[dict[str, Any]]:
    """OpenAI messages -> owl2's message list, each ``image_url`` part replaced by its decoded image."""
    remaining = iter(images)
    out = []
    for message in body.messages:
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            out.append({"role": role, "content": message.content or ""})
            continue
        parts = [{"type": "text", "text": p.text} if p.type == "text" else {"type": "image", "image": next(remaining)}
                 for p in message.content]
        out.append({"role": role, "content": parts})
    return out


async def build_generation_requests(
    pipeline: Any, settings: "ServerSettings", body: ChatCompletionRequest, *, context_length: int,
    max_prompt_tokens: int,
) -> tuple[list[GenerationRequest], int]:
    """One generation request per choice and the prompt's length in tokens (images counted as their visual
    tokens), or :class:`APIError`: the model name, the images (fetched and decoded in the thread pool), the token
    limits against ``settings`` and the ``context_length``, then the prompt rendered by ``pipeline.request``."""
    check_model(body.model, settings.model_name)
    urls = [part.image_url.url for m in body.messages if isinstance(m.content, list)
            for part in m.content if part.type == "image_url"]
    if len(urls) > settings.max_images_per_request:
        raise APIError(400, f"{len(urls)} images in one request; the limit is {settings.max_images_per_request}",
                       param="messages", code="too_many_images")
    try:
        images = await run_in_threadpool(lambda: [fetch_image(u, settings.images) for u in urls])
    except TooManyDownloads as exc:  # not the request's fault: retry later
        raise APIError(429, str(exc), "rate_limit_error", param="messages", code="too_many_downloads") from exc
    except ValueError as exc:
        raise APIError(400, f"invalid image: {exc}", param="messages", code="invalid_image") from exc
    messages = chat_messages(body, images)
    requested = body.requested_max_tokens
    if requested is not None and requested > settings.max_new_tokens:
        raise APIError(400, f"max_tokens {shown(requested)} is over this server's limit of "
                       f"{settings.max_new_tokens}",
                       param="max_tokens")
    min_tokens = body.min_tokens or 0
    if min_tokens > (requested or settings.max_new_tokens):  # over max_tokens is refused by the protocol
        raise APIError(400, f"min_tokens {shown(min_tokens)} is over this server's limit of "
                       f"{settings.max_new_tokens}",
                       param="min_tokens")
    sampling: dict[str, Any] = {
        "max_new_tokens": requested or settings.max_new_tokens,
        "temperature": settings.default_temperature if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": max(body.top_k or 0, 0),
        "repetition_penalty": body.repetition_penalty or 1.0,
        "min_new_tokens": min_tokens,
        "stop": body.stop_list,
        "seed": body.seed,
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
    }
    try:
        request = await run_in_threadpool(pipeline.request, messages, **sampling)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    prompt_tokens = pipeline.engine.prompt_tokens(request)
    if prompt_tokens > max_prompt_tokens:
        raise APIError(400, f"the prompt takes {prompt_tokens} tokens (images included); the limit is "
                       f"{max_prompt_tokens}", param="messages", code="context_length_exceeded")
    room = context_length - prompt_tokens
    if requested is not None and requested > room:
        raise APIError(400, f"this model's context is {context_length} tokens; the prompt takes "
                       f"{prompt_tokens}, which leaves {room} for the answer, but max_tokens is {requested}",
                       param="max_tokens", code="context_length_exceeded")
    if min_tokens > room:
        raise APIError(400, f"this model's context is {context_length} tokens; the prompt takes "
                       f"{prompt_tokens}, which leaves {room} for the answer, but min_tokens is {min_tokens}",
                       param="min_tokens", code="context_length_exceeded")
    try:  # every value was checked above; a setting that still does not fit is the request's fault, not ours
        params = dataclasses.replace(request.params, max_new_tokens=min(request.params.max_new_tokens, room))
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    requests = []
    for choice in range(body.n):
        seed = None if body.seed is None else body.seed + choice
        requests.append(GenerationRequest(request.prompt_ids, request.images,
                                          dataclasses.replace(params, seed=seed)))
    return requests, prompt_tokens


def logprob_entry(tokenizer: Any, event: StepEvent) -> dict[str, Any] | None:
    """OpenAI's logprob entry of one step (the token, its log-probability and the top alternatives, each token as
    text by ``tokenizer.token_text``), or None when the step carries none."""
    if event.logprob is None or event.token_id is None:
        return None
    text = tokenizer.token_text
    top = [(text(t), lp) for t, lp in event.top_logprobs or []]
    return token_logprob(text(event.token_id), event.logprob, top)
