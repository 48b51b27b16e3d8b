"""The chat server's errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

    raise APIError(400, "prompt: give a string or a non-empty list of strings", "prompt")   # inside a route
    return error_response(413, "the request body exceeds 4194304 bytes; ...")              # anywhere: an ASGI app
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

ERROR_TYPES = {401: "authentication_error", 404: "not_found_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)
