"""What kimi-pool knows of the Moonshot Open Platform's model families: whether a model thinks, how
thinking is switched, whether it reads images, and which of Kimi's thinking rules apply to it.
Pure data and one lookup; opens nothing.

The facts, as Moonshot documents them (late 2026):

* ``kimi-k3`` (and ``kimi-k3.x``): always reasons; the top-level ``reasoning_effort`` takes ``low``,
  ``high`` or ``max``; there is no ``thinking`` field; a forced ``tool_choice`` works with thinking on.
* ``kimi-k2.7-code``: always thinks (``thinking`` accepts only ``enabled``); no effort levels.
* ``kimi-k2.5``, ``kimi-k2.6``: think unless ``thinking: {"type": "disabled"}``; no effort levels.
* ``kimi-k2-thinking(-turbo)``: always think.
* everything older (``moonshot-v1-*``, the K2 ``-preview`` ids, ``kimi-latest``): never think.

Every thinking K2 model answers 400 to a forced ``tool_choice`` (``required`` or a named function) while
thinking is on, and to a tool-call history whose assistant turns lack ``reasoning_content``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Thinking = Literal["none", "default", "always"]


@dataclass(frozen=True, slots=True)
class ModelTraits:
    thinking: Thinking = "none"
    """``none``: never thinks; ``default``: thinks unless disabled; ``always``: cannot be disabled."""
    efforts: bool = False
    """Takes ``reasoning_effort`` (``low``/``high``/``max``) rather than the ``thinking`` field."""
    vision: bool = False
    """Reads image (and video) parts."""
    forced_tool_while_thinking: bool = False
    """A forced ``tool_choice`` is accepted while the model thinks."""


_K3 = ModelTraits(thinking="always", efforts=True, vision=True, forced_tool_while_thinking=True)
_K2_DEFAULT_ON = ModelTraits(thinking="default", vision=True)
_FAMILIES: tuple[tuple[re.Pattern[str], ModelTraits], ...] = (
    (re.compile(r"^kimi-k(?:[3-9]|\d{2,})(?:[.-]|$)"), _K3),
    (re.compile(r"^kimi-k2\.(?:[7-9]|\d{2,})"), ModelTraits(thinking="always")),
    (re.compile(r"^kimi-k2\.[56]"), _K2_DEFAULT_ON),
    (re.compile(r"^kimi-k2-thinking"), ModelTraits(thinking="always")),
    (re.compile(r"^kimi-latest|^moonshot-v1-.*vision"), ModelTraits(vision=True)),
)
_PLAIN = ModelTraits()


def moonshot_traits(model: str) -> ModelTraits:
    """The traits of a Moonshot model id (an unknown id of an old family: the plain, non-thinking ones)."""
    for pattern, traits in _FAMILIES:
        if pattern.match(model):
            return traits
    return _PLAIN
