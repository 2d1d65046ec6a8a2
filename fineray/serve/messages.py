"""The typed messages between the HTTP ingress (`serve.api`) and the model deployment (`serve.app.ModelServer`).

The ingress sends a `GenerationJob` (token ids, choices per prompt, sampling settings); the deployment answers
with `ChoiceText`s (a whole choice, or a streamed piece of one) or a `GenerationError` carrying the HTTP status
the ingress returns. They travel through Ray Serve handles (pickled), so they hold plain data only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fineray.serve.protocol import APIError

if TYPE_CHECKING:  # sampling imports torch; the ingress and the app module stay light without it
    from fineray.serve.sampling import SamplingParams

__all__ = ["ChoiceText", "GenerationError", "GenerationJob"]


@dataclass(frozen=True)
class GenerationJob:
    """One request's generation work.

    Attributes:
        prompts: the prompts as token ids (the ingress tokenises, so limits and `usage` are exact).
        n: choices per prompt; choice `i` belongs to prompt `i // n`.
        params: sampling settings, `max_tokens` included; choice `j` of a seeded request uses `seed + j`.
    """

    prompts: list[list[int]]
    n: int
    params: SamplingParams

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass(frozen=True)
class ChoiceText:
    """Text of one choice: all of it (non-streaming) or the piece generated since the last one (streaming).

    `finish_reason` and `tokens` (completion tokens of the whole choice) are set on its last piece.
    """

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        """What the OpenAI response builders and the request log take: index, text, finish_reason."""
        return {"index": self.index, "text": self.text, "finish_reason": self.finish_reason}


@dataclass(frozen=True)
class GenerationError:
    """A failure of the model deployment, as the OpenAI error the ingress returns."""

    status: int
    message: str
    code: str
    type: str = "server_error"
    param: str | None = None

    def api_error(self) -> APIError:
        return APIError(self.status, self.message, type=self.type, code=self.code, param=self.param)
