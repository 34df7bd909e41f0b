"""What a small trained model knows, where its folder says so: the demo model's words and sizes.

The demo model (`demo/`) draws one shape on a plain background, at the sizes it was measured drawing.
Any other prompt or size runs, but what it draws is not what was asked, so a prediction's log says
so in one line. The demo's training writes `world.json` beside its releases; a real FLUX folder
has none, and nothing here applies to it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

WORLD_FILE = "world.json"
PROMPT_SHOWN = 80  # characters of a prompt quoted back


@dataclass(frozen=True)
class ModelWorld:
    description: str  # "one shape on a plain background"
    example: str  # a prompt it draws
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]
    sizes: frozenset[tuple[int, int]]  # (width, height) it was measured drawing (quality.json)
    sizes_known: str  # those sizes in words, for the log line

    @classmethod
    def load(cls, root: Path) -> ModelWorld | None:
        """The world of the model folder `root`, or None when it has no WORLD_FILE."""
        path = Path(root) / WORLD_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(
            description=data["description"],
            example=data["example"],
            shapes=tuple(data["shapes"]),
            colours=tuple(data["colours"]),
            backgrounds=tuple(data["backgrounds"]),
            sizes=frozenset((int(width), int(height)) for width, height in data["sizes"]),
            sizes_known=data["sizes_known"],
        )

    def knows_prompt(self, prompt: str) -> bool:
        """Names one shape, with one of the colours before it, and "on a <colour> background";
        other words (a trigger word, "striped") may come along."""
        words = scene_words(prompt, self.shapes, self.colours, self.backgrounds)
        return len(words.shapes) == 1 and bool(words.coloured) and len(words.backgrounds) == 1

    def notes(self, prompt: str, size: tuple[int, int]) -> list[str]:
        """One log line for a prompt outside the world, one for a size it does not draw reliably."""
        found = []
        if not self.knows_prompt(prompt):
            shown = prompt if len(prompt) <= PROMPT_SHOWN else prompt[: PROMPT_SHOWN - 3] + "..."
            found.append(
                f"Demo model: {shown!r} is outside what it knows, so expect shapes, not the prompt. It "
                f"draws {self.description}, prompted like {self.example!r}: shapes {_listed(self.shapes)}; "
                f"colours {_listed(self.colours)}; backgrounds {_listed(self.backgrounds)}"
            )
        if size not in self.sizes:
            found.append(
                f"Demo model: {size[0]}x{size[1]} is not a size it draws reliably, so expect a rough picture. "
                f"It draws {self.sizes_known}"
            )
        return found


@dataclass(frozen=True)
class SceneWords:
    """The world's words a prompt uses, each distinct, in the order they appear."""

    shapes: list[str]
    coloured: list[str]  # "red circle": a colour right before a shape
    backgrounds: list[str]  # "blue", from "blue background"


def scene_words(
    prompt: str, shapes: tuple[str, ...], colours: tuple[str, ...], backgrounds: tuple[str, ...]
) -> SceneWords:
    """The one reading of a prompt that the server's check and the demo world's parser share."""
    text = prompt.lower()
    return SceneWords(
        shapes=_distinct(rf"\b({_either(shapes)})\b", text),
        coloured=_distinct(rf"\b({_either(colours)})\s+({_either(shapes)})\b", text),
        backgrounds=_distinct(rf"\b({_either(backgrounds)})\s+background\b", text),
    )


def _distinct(pattern: str, text: str) -> list[str]:
    """Distinct matches in order, a match of several groups joined by a space."""
    found = (" ".join(match) if isinstance(match, tuple) else match for match in re.findall(pattern, text))
    return list(dict.fromkeys(found))


def _either(words: tuple[str, ...]) -> str:
    return "|".join(map(re.escape, words))


def _listed(words: tuple[str, ...]) -> str:
    return ", ".join(words)
