"""Ratings of answers: a JSON Lines log in a folder the app's owner names (``--feedback-dir``), and its summary.

One line per rating (like, dislike with an optional reason, flag, or a rating taken back): the time, the model, the
question, the answer, the decoding options it was made with, the rating, and the picture's SHA-256; the picture itself
is saved once, by that hash, under ``images/`` in the same folder. The log stores visitors' pictures: it is off unless
the owner turns it on.

    python -m blipdemo.feedback summary DIR      # ratings per model and per kind of question
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

LOG_NAME = "ratings.jsonl"
IMAGES = "images"
RATINGS = ("like", "dislike", "flag", "withdrawn")
# The kinds of question a summary counts, by how the question starts (the first that matches; else "other").
QUESTION_KINDS = (
    ("color", r"what colou?r|which colou?r"),
    ("count", r"how many|count"),
    ("where", r"where|which side|in which"),
    ("shape", r"what shape|which shape|what kind of shape"),
    ("yes/no", r"is |are |does |do |can |was |were |has |have "),
    ("description", r"describe|what is (in|shown)|what do you see|caption|what's in"),
)


def question_kind(question: str) -> str:
    """The kind of a question, by its opening words: color, count, where, shape, yes/no, description or other."""
    text = " ".join(question.lower().split())
    for kind, pattern in QUESTION_KINDS:
        if re.match(pattern, text):
            return kind
    return "other"


@dataclass(frozen=True)
class Rating:
    """One line of the log. ``rating``: one of RATINGS; ``reason``: the reason chosen with a dislike (or a flag), if
    any; ``decoding``: the answer's decoding options (None when unknown, e.g. an example's earlier turn); ``image``:
    the picture's SHA-256 (None: no picture known)."""

    time: str
    model: str
    question: str
    answer: str
    decoding: dict | None
    rating: str
    reason: str | None
    image: str | None


def now() -> str:
    """The time of a rating: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class FeedbackLog:
    """Appends ratings to ``folder/ratings.jsonl``, each picture saved once as ``folder/images/<sha256><suffix>``.
    Safe to call from several threads at once."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.folder / LOG_NAME

    def check(self) -> str | None:
        """None if the log can be written, else why not (the folder is created if missing)."""
        try:
            (self.folder / IMAGES).mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8"):
                pass
        except OSError as e:
            return f"the feedback folder {self.folder} cannot be written ({e.strerror or e})"
        return None

    def save_picture(self, picture: str | Path) -> str:
        """The picture file's SHA-256, the file copied under ``images/`` unless a copy is there already."""
        data = Path(picture).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        suffix = Path(picture).suffix.lower()
        if not re.fullmatch(r"\.[a-z0-9]{1,5}", suffix):
            suffix = ""
        target = self.folder / IMAGES / f"{digest}{suffix}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(data)
            partial.replace(target)  # whole or absent: a reader never sees half a picture
        return digest

    def write(self, rating: Rating) -> None:
        """Append one line (OSError if the folder cannot be written)."""
        line = json.dumps(asdict(rating), ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)


def read(folder: str | Path) -> tuple[list[dict], int]:
    """(the log's ratings, how many lines were not ratings — damaged or cut short)."""
    path = Path(folder) / LOG_NAME
    records, bad = [], 0
    if not path.is_file():
        return records, bad
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict) and record.get("rating") in RATINGS:
            records.append(record)
        else:
            bad += 1
    return records, bad


def summary(records: Iterable[dict]) -> dict[str, dict[str, Counter]]:
    """Ratings counted per model and per kind of question: ``{"model": {name: Counter}, "kind": {kind: Counter}}``."""
    by: dict[str, dict[str, Counter]] = {"model": defaultdict(Counter), "kind": defaultdict(Counter)}
    for r in records:
        by["model"][str(r.get("model", "?"))][r["rating"]] += 1
        by["kind"][question_kind(str(r.get("question", "")))][r["rating"]] += 1
    return {k: dict(v) for k, v in by.items()}


def format_summary(records: list[dict], bad: int = 0) -> str:
    """The summary as a plain-text table: per model, then per kind of question, the count of each rating and the
    share of likes among likes and dislikes."""
    if not records:
        return "No ratings yet." + (f" ({bad} lines could not be read.)" if bad else "")
    counts = summary(records)
    lines = [f"{len(records)} ratings" + (f" ({bad} lines could not be read)" if bad else "")]
    for title, key in (("Per model", "model"), ("Per kind of question", "kind")):
        rows = counts[key]
        width = max(len(title), *(len(name) for name in rows))
        lines += ["", f"{title:<{width}}  " + "  ".join(f"{r:>9}" for r in RATINGS) + "  liked"]
        for name in sorted(rows):
            c = rows[name]
            rated = c["like"] + c["dislike"]
            liked = f"{100 * c['like'] / rated:.0f}%" if rated else "-"
            lines.append(f"{name:<{width}}  " + "  ".join(f"{c[r]:>9}" for r in RATINGS) + f"  {liked:>5}")
    reasons = Counter(r["reason"] for r in records if r.get("reason"))
    if reasons:
        lines += ["", "Reasons given"] + [f"  {n:>4}  {reason}" for reason, n in reasons.most_common()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blipdemo.feedback", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("summary", help="ratings per model and per kind of question")
    show.add_argument("folder", type=Path, help="the app's --feedback-dir")
    args = parser.parse_args(argv)
    if not (args.folder / LOG_NAME).is_file():
        parser.error(f"no ratings log in {args.folder} (expected {args.folder / LOG_NAME})")
    print(format_summary(*read(args.folder)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
