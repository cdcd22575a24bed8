"""The lexicon, prompt sets and texts that ship with the evaluation (``data/``, written for
this project)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from steer_server.measure.metrics import Lexicon

DATA = Path(str(files("steer_server.measure") / "data"))


def _lines(path: Path) -> list[str]:
    """Non-empty lines that are not ``#`` comments (leading/trailing space kept off)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def read_prompts(path: Path) -> list[str]:
    prompts = _lines(path)
    if not prompts:
        raise ValueError(f"{path}: no prompts (one a line; # starts a comment)")
    return prompts


def wedding_lexicon() -> Lexicon:
    return Lexicon.from_file(DATA / "wedding_lexicon.txt", "wedding")


def neutral_prompts() -> list[str]:
    return read_prompts(DATA / "neutral_prompts.txt")


def calibration_prompts() -> list[str]:
    """What ``calibrate`` steers on by default: none of them is an evaluation prompt."""
    return read_prompts(DATA / "calibration_prompts.txt")


def hostile_prompts() -> list[str]:
    return read_prompts(DATA / "hostile_prompts.txt")


def sentiment_pairs_file() -> Path:
    """80 contrast pairs, positive and negative sentiment, one ``{"positive", "negative"}`` a line:
    each pair says the same thing about the same subject in the same form, so what differs is the
    sentiment. The file is what ``POST /v1/steering/vectors`` takes as a pairs upload."""
    return DATA / "sentiment_pairs.jsonl"


def wedding_pairs_file() -> Path:
    """40 contrast pairs: a sentence about a wedding, and the same sentence about something else."""
    return DATA / "wedding_pairs.jsonl"


def offtopic_texts() -> list[str]:
    """Paragraphs of ``offtopic_texts.txt`` (blank-line separated, comment lines dropped)."""
    text = "\n".join(line for line in (DATA / "offtopic_texts.txt").read_text(encoding="utf-8").splitlines()
                     if not line.startswith("#"))
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
