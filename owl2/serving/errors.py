"""The server's refusals: :class:`APIError` and OpenAI's error JSON, with the client's input quoted briefly."""


from fastapi.responses import JSONResponse

from owl2.serving.protocol import error_body


class APIError(Exception):
    """A request the server refuses: answered with OpenAI's error JSON and ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


MAX_ERROR_CHARS = 500
"""An error message or param is cut to this many characters: they quote the client's input (a field name, a model
name, a number), which may be megabytes long."""

ECHO_CHARS = 40
"""A piece of the client's input quoted in an error message (a field name, a model name) is cut to this length."""


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """``text``, or its start and an ellipsis when it is longer than ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "…"


def shown(number: int) -> str:
    """An integer of the client's as written in a message: its digits, or how many there are when they are many."""
    digits = str(number)
    return digits if len(digits) <= 20 else f"of {len(digits):,} digits"


def error_response(status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
           code: str | None = None) -> JSONResponse:
    """OpenAI's error JSON; message and param are cut to :data:`MAX_ERROR_CHARS`, whatever they quote."""
    return JSONResponse(error_body(clip(message, MAX_ERROR_CHARS), kind,
                                   param=None if param is None else clip(param, MAX_ERROR_CHARS), code=code),
                        status_code=status)
