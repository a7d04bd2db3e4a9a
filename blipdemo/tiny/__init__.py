"""The embedded tiny model: synthetic shapes scenes, tokenizers, training and evaluation."""

from pathlib import Path

# The trained tiny InstructBLIP shipped in assets/: what the app and `python -m blipdemo.embed` fall back to.
EMBEDDED_MODEL = Path(__file__).resolve().parents[2] / "assets" / "shapes-instructblip"
