"""Smoke tests: the training, evaluation and benchmark scripts still run, end to end, at tiny settings.

The README's figures come from these scripts; nothing else imports most of them, so without these tests they
could rot unnoticed until the next measurement. Each runs as the README runs it, in a subprocess (offline),
at sizes that take seconds, and must exit 0 and print its table (and, where the script checks correctness,
say that it did). Nothing here checks a timing: at these sizes the numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import reference_env
import torch
from conftest import OFFLINE

import blipdemo
from blipdemo.attention import AGGREGATIONS, METHODS
from blipdemo.tiny import EMBEDDED_MODEL, scenes
from blipdemo.tiny.evaluate import EVAL_SEED
from blipdemo.tiny.train import FRAMED_WEIGHTS

ROOT = Path(__file__).resolve().parent.parent
# Per script, a guard against a hang on a busy 2-core CI, not a timing check: each takes 5-30 s there.
BUDGET = 300


def run(*args: str) -> str:
    """``python *args`` from the repository root, offline; its stdout, once it has exited 0."""
    done = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **OFFLINE},
        timeout=BUDGET,
    )
    assert done.returncode == 0, (
        f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_train_a_few_steps(tmp_path):
    out = tmp_path / "model"
    steps = ["--vit-steps", "3", "--qa-steps", "3", "--eval-every", "1000", "--warmup", "1", "--batch-size", "8"]
    steps += ["--framing-steps", "2", "--framing-scenes", "16", "--framing-eval-every", "1000", "--framing-rounds", "2"]
    stdout = run("-m", "blipdemo.tiny.train", "--out", str(out), "--train-scenes", "64", "--eval-scenes", "16", *steps)
    assert f"saved {out}" in stdout
    log = json.loads((out / "training_log.json").read_text())
    assert (log["config"]["vit_steps"], log["config"]["qa_steps"]) == (3, 3)
    assert [h["step"] for h in log["history"]] == [3]  # the final evaluation
    assert set(log["history"][0]) == {"step", *scenes.FAMILIES}
    # Stage 3: each round evaluated before it began and at its end, every family plain and the framed ones framed.
    rounds = log["framing"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all([h["step"] for h in r["history"]] == [0, 2] for r in rounds)
    framed = {f"framed {family}" for family in FRAMED_WEIGHTS}
    assert set(rounds[-1]["history"][-1]) == {"step", *scenes.FAMILIES, *framed}
    # What it saved is a checkpoint in the published layout that loads and answers (a wrong answer is fine here).
    rng = random.Random(0)
    image = scenes.render(scenes.sample_scene(rng), rng)
    assert isinstance(blipdemo.load(out, dtype="float32").ask(image, "Describe the image."), str)


def test_framing_rounds_go_on_from_a_checkpoint(tmp_path):
    """``--init`` with ``--first-round``: more stage-3 rounds from a saved checkpoint, whose log it keeps."""
    shipped = json.loads((EMBEDDED_MODEL / "training_log.json").read_text())
    done = len(shipped["framing"]["rounds"])
    out = tmp_path / "model"
    args = ["--init", str(EMBEDDED_MODEL), "--out", str(out), "--train-scenes", "32", "--eval-scenes", "16"]
    args += ["--framing-steps", "2", "--framing-scenes", "16", "--warmup", "1", "--batch-size", "8"]
    stdout = run("-m", "blipdemo.tiny.train", *args, "--first-round", str(done), "--framing-rounds", str(done + 1))
    assert f"saved {out}" in stdout
    log = json.loads((out / "training_log.json").read_text())
    assert log["history"] == shipped["history"] and log["stage1"] == shipped["stage1"]
    assert log["framing"]["rounds"][:done] == shipped["framing"]["rounds"]
    added = log["framing"]["rounds"][done:]
    assert [r["round"] for r in added] == [done + 1] and added[0]["from"] == str(EMBEDDED_MODEL)
    assert log["config"]["framing_steps"] == 2
    # Asked to go on from a round it has not reached, it refuses before any work.
    with pytest.raises(AssertionError, match="has stage-3 rounds"):
        run("-m", "blipdemo.tiny.train", *args, "--first-round", str(done + 1), "--framing-rounds", str(done + 2))
    trained, before = blipdemo.load(out, dtype="float32"), blipdemo.load(EMBEDDED_MODEL, dtype="float32")
    assert trained.config.blipdemo == before.config.blipdemo  # the app still reads how many turns it keeps
    moved = [
        name
        for (name, a), (_, b) in zip(trained.model.named_parameters(), before.model.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert any(n.startswith("vision_model") for n in moved) and any(n.startswith("language_model") for n in moved)


def test_evaluate_the_shipped_model_writes_its_json(tmp_path):
    model = tmp_path / "shapes-instructblip"
    shutil.copytree(EMBEDDED_MODEL, model)  # a copy: the default output goes into the model's folder
    stdout = run("-m", "blipdemo.tiny.evaluate", str(model), "--per-family", "3")
    assert "| family | accuracy (3 scenes each) |" in stdout
    record = json.loads((model / "evaluation.json").read_text())
    assert (record["seed"], record["per_family"]) == (EVAL_SEED, 3)
    assert record["command"] == f"python -m blipdemo.tiny.evaluate {model} --per-family 3"
    datetime.fromisoformat(record["date"])
    # Every family alone (a follow-up after its turn), then single-turn questions after earlier turns of a chat.
    assert list(record["families"]) == [*scenes.FAMILIES, "in a chat"]
    for family, r in record["families"].items():
        assert r["count"] == 3 and 0 <= r["correct"] <= 3 and r["accuracy"] == r["correct"] / 3
        assert f"| {family} | {100 * r['accuracy']:.1f}% |" in stdout  # the printed table is the file's
    assert record["dtype"] in ("bfloat16", "float32") and record["device"] == "cpu"


def test_speed_benchmark_eager_and_compiled_in_one_run(tmp_path):
    stdout = run(
        "benchmarks/speed.py",
        *("--tiny", "--new-tokens", "3", "--repeats", "1", "--variants", "eager,compile", "--workdir", str(tmp_path)),
    )
    assert stdout.startswith("machine: ") and "AVX512-BF16" in stdout and "matmul peak" in stdout
    for variant in ("eager", "compile"):
        assert f"same tokens as transformers ({variant}): checked, all 3 greedy token ids equal" in stdout
    assert "| measure | blipdemo eager | blipdemo compile | transformers | eager / transformers (time) |" in stdout
    assert "| decode: time per token |" in stdout
    assert "| blipdemo alone: A vs B | A | B | A − B | A / B |" in stdout
    assert "| LM decoder layers: 8-bit (A) vs bfloat16 (B) |" in stdout
    result = json.loads((tmp_path / "last_result.json").read_text())
    assert result["variants"] == ["eager", "compile"] and set(result["blipdemo"]) == {"eager", "compile"}
    assert result["machine"]["matmul_peak_bfloat16"] > 0 and result["machine"]["matmul_peak_float32"] > 0


def test_embed_speed_against_diffusers(tmp_path):
    reference_env.ensure()  # the diffusers 0.31 reference venv (made once; the script would make it too)
    stdout = run("benchmarks/embed_speed.py", "--tiny", "--runs", "1", "--workdir", str(tmp_path))
    assert stdout.startswith("machine: ") and "matmul peak" in stdout  # the README quotes the peak from here
    for dtype in ("bfloat16", "float32"):
        assert re.search(rf"attention op 1×16×257×64 \({dtype}, median\): .* SDPA takes [\d.]+×", stdout), dtype
    assert "| dtype | diffusers (s) | blipdemo (s) | ours / reference |" in stdout
    assert "| float32 |" in stdout and "| bfloat16 |" in stdout
    assert "decode the PNG file, preprocess, Q-Former" in stdout
    assert re.search(
        r"largest difference from diffusers' embedding \(float32\): \S+ \(checked: at most 1e-04\)", stdout
    )


def test_picture_change(tmp_path):
    """The README's table on a new picture mid-chat: a row per question family, a share per policy."""
    stdout = run("benchmarks/picture_change.py", "--model", str(EMBEDDED_MODEL), "--scenes", "2")
    assert "| question about the new picture (2 per family) | new context | labelled text | as if about B |" in stdout
    for family in (*scenes.SINGLE_TURN, "\\*\\*all\\*\\*"):
        assert re.search(rf"\| {family} \|( \**\d+\.\d%\** \|){{3}}", stdout), family


def test_pointing_game(tmp_path):
    stdout = run("benchmarks/pointing_game.py", "--model", str(EMBEDDED_MODEL), "--scenes", "2")
    assert "| pointing game (2 fresh scenes, box + 15 px) | hit rate |" in stdout
    for family in ("where", "color", "describe", "relation", "reverse describe"):
        baseline = "random word" if family == "reverse describe" else "random patch"
        for aggregation in (*AGGREGATIONS, baseline):
            assert re.search(rf"\| {family} / {aggregation} \| \d+\.\d% \|", stdout), (family, aggregation)
    # Methods × aggregations × question types, and what the maps of one answer cost per method.
    columns = [f"{method} {aggregation}" for method in METHODS for aggregation in AGGREGATIONS]
    assert f"| question (cases) | {' | '.join(columns)} | random |" in stdout
    for family in ("where", "color", "describe", "relation", "reverse describe"):
        assert re.search(rf"\| {family} \(\d+\)( \| \d+\.\d%){{{len(columns) + 1}}} \|", stdout), family
    for method in METHODS:
        assert re.search(rf"- {method}: \d+ ms", stdout), method


def test_explain_cost():
    stdout = run("benchmarks/explain_cost.py", "--runs", "1", "--only-embedded")
    assert stdout.startswith("machine: ") and "matmul peak" in stdout
    header = "| model | operation | answer tokens | time (median of 1) | CPU time (median) | CPU time × ask |"
    assert header + " peak memory above the model |" in stdout
    for operation in ("ask", "explain attention", "explain relevancy", "maps attention", "maps relevancy"):
        figures = r"\d+ \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+ \| -?[\d.]+ MiB"
        assert re.search(rf"\| embedded \(shapes-instructblip\) \(float32\) \| {operation} \| {figures} \|", stdout)
    ratios = r"[\d.]+× the time; [\d.]+× the CPU time; [\d.]+× the peak memory"
    assert re.search(rf"- embedded \(shapes-instructblip\): {ratios}", stdout)


@pytest.mark.parametrize("batch", [1, 4])
def test_load_test_with_distinct_requests(batch):
    stdout = run("benchmarks/load_test.py", "--clients", "5", "--queue-size", "2", "--max-batch-size", str(batch))
    assert "| client | image | question sent | expected | outcome | answer | latency |" in stdout
    for i in range(5):
        assert f"| {i} | client-{i:02d}.png | " in stdout  # every client's own request, printed
    summary = re.search(rf"\n\| 5 \| 2 \| {batch} \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", stdout)
    assert summary, stdout
    correct, wrong, queue_full, failed = map(int, summary.groups())
    assert correct + wrong + queue_full == 5 and failed == 0
    assert re.search(r"correctness: \d+ answers checked against each scene's known answer: .* 0 differ", stdout)


def test_batching_benchmark_tiny():
    stdout = run(
        "benchmarks/batching.py", "--tiny", "--sizes", "1,2", "--tokens", "3", "--stagger", "1", "--repeats", "1"
    )
    assert stdout.startswith("machine: ") and "matmul peak" in stdout
    assert re.search(r"step time \(ms\) by live rows: 1: [\d.]+, 2: [\d.]+; prefill alone \(ms\): ", stdout)
    number = r"[\d.]+"
    for n in (1, 2):  # ours min / median, ideal, ours / ideal, in turn min / median, speed-up, same answers
        assert re.search(
            rf"\n\| {n} \| at once \| {number} / {number} \| {number} \| {number}× \| {number} / {number} \| "
            rf"{number}× \| {n}/{n} \|",
            stdout,
        ), n
    assert re.search(
        rf"\n\| 2 \| every 1 steps \| {number} / {number} \| {number} \| {number}× \| – \| – \| – \|", stdout
    )


def test_without_a_browser_the_browser_tests_skip_with_a_reason_and_nothing_else_needs_one():
    """A newcomer's machine has no Chromium: the browser tests are skipped, saying why (and fail where one is
    required, as CI requires it), and the stop-latency benchmark, which has browser rows, still runs."""
    env = {**os.environ, **OFFLINE, "BLIPDEMO_CHROMIUM": "/nonexistent/chromium"}
    env.pop("BLIPDEMO_REQUIRE_BROWSER", None)
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_browser.py"]
    skipped = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUDGET)
    assert skipped.returncode in (0, 5) and "1 skipped" in skipped.stdout, skipped.stdout  # 5: none ran
    assert "chromium is not installed (/nonexistent/chromium)" in skipped.stdout, skipped.stdout
    required = subprocess.run(
        command, cwd=ROOT, env={**env, "BLIPDEMO_REQUIRE_BROWSER": "1"}, capture_output=True, text=True, timeout=BUDGET
    )
    assert required.returncode != 0 and "BLIPDEMO_REQUIRE_BROWSER=1" in required.stdout, required.stdout
    latency = subprocess.run(
        [sys.executable, "benchmarks/stop_latency.py", "--runs", "1", "--step", "0.05", "--no-zerogpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUDGET,
    )
    assert latency.returncode == 0, latency.stdout + latency.stderr
    assert "no browser rows" in latency.stdout and "| gradio_client cancels" in latency.stdout


def test_stop_latency():
    """Every way of stopping is measured (the browser rows need Debian's chromium; the ZeroGPU rows fork workers)."""
    from browser import AVAILABLE

    stdout = run("benchmarks/stop_latency.py", "--runs", "1", "--step", "0.05")
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and " s |" in line]
    expected = 5 + (2 if AVAILABLE else 0) + 2
    assert len(rows) == expected, stdout
    assert sum(row.startswith("| ZeroGPU: gradio_client cancels") for row in rows) == 2


@pytest.mark.parametrize("mode", [("--max-batch-size", "8"), ("--concurrency", "4")])
def test_streaming_visitors_at_once_get_every_answer_whole_with_its_maps(mode):
    """The short version of benchmarks/load_stream.py: 8 visitors chat at once through the chat event, four with
    12-megapixel photos, maps on. No answer may be cut short or differ from the same question asked alone, and
    every answer's maps must come (the script exits non-zero otherwise): a busy event loop is not a vanished client."""
    stdout = run(
        "benchmarks/load_stream.py", "--clients", "8", "--rounds", "1", "--large", "4", "--timeout", "120", *mode
    )
    summary = re.search(
        r"\n\| 8 \| 1 \| 4 × 12 MP \| \d+ \| \d+ \| 0 ms \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", stdout
    )
    assert summary, stdout
    answers, cut, differ, no_maps, failed = map(int, summary.groups())
    assert (answers, cut, differ, no_maps, failed) == (8, 0, 0, 0, 0), stdout


def test_cpu_quantization_benchmark_tiny(tmp_path):
    """The short version of benchmarks/cpu_quantization.py, on the embedded model (each variant in a process of its
    own): every variant runs, its row is printed, and its answers are scored (the README's figures: the full run)."""
    stdout = run(
        "benchmarks/cpu_quantization.py",
        # 12 tokens, median of 3: one token costs ~1.3 ms here, so 3 tokens timed once could come out negative
        # ("-0.3" ms a token) on a busy machine, and the row is not a speed row any more.
        *("--tiny", "--skip-full", "--per-family", "1", "--new-tokens", "12", "--repeats", "3"),
        *("--workdir", str(tmp_path)),
    )
    assert stdout.startswith("machine: ") and "memory bandwidth" in stdout
    for variant in ("float32", "bfloat16", "int8", "int4", "bnb 8-bit", "bnb nf4"):
        assert re.search(rf"\n\| {variant} \| [\d.]+ \| [\d.]+× \|", stdout), variant  # its speed row
        assert re.search(rf"\n\| {variant} \|( [\d.]+ \|){{10}} \d+/10 \|", stdout), variant  # its answers, scored


def test_look_closer_benchmark_short():
    """The short version of benchmarks/look_closer.py: its tables, with the machine, on the embedded model."""
    stdout = run("benchmarks/look_closer.py", "--per-family", "2", "--v12-per-family", "1", "--only-default")
    assert stdout.startswith("machine: ") and "matmul peak" in stdout
    assert "| Version 3 (2 pictures per family) | color | shape | count | exists |" in stdout
    for row in ("without look-closer", "default (attention, mass box ≥ 3 inputs, 2 steps, crop)"):
        assert re.search(rf"\| {re.escape(row)} \|( \d+\.\d% \|){{4}}", stdout), row
    assert re.search(r"with look-closer \(default\) \d+ ms: \d+\.\d\dx", stdout)
    for row in ("color", "where", "describe", "follow-up"):
        assert re.search(rf"\| {row} \| \d+\.\d% \| \d+\.\d% \|", stdout), row


def test_soak_short():
    """The short version of benchmarks/soak.py: chat turns, Stops, visitors who vanish mid-answer and hostile input
    from 8 visitors at once; the script exits non-zero on any error, unclear refusal, changed answer, missing map or
    traceback in the server's log. A vanish must have seen its answer start (it once sent a stale payload that the app
    refused at once, and counted that as a vanish). Memory is judged by the full run only (README)."""
    stdout = run("benchmarks/soak.py", "--requests", "60", "--clients", "8", "--sample", "0.2")
    sent = {kind: int(n) for kind, n, _ in re.findall(r"\n\| (chat|stop|vanish|hostile) \| (\d+) \| (\d+) \|", stdout)}
    assert all(sent.get(kind) for kind in ("chat", "stop", "vanish", "hostile")), stdout
    assert "errors by kind: none" in stdout and "the server stayed up" in stdout, stdout


def test_cpu_linear_benchmark_small():
    stdout = run("benchmarks/cpu_linear.py", "--rows", "1,3", "--shape", "64x32")
    assert stdout.startswith("machine: ") and "matmul peak" in stdout
    for m in (1, 3):  # F.linear, (W · xᵀ)ᵀ, oneDNN (or – where this build has none)
        assert re.search(rf"\n\| {m} \| [\d.]+ \| [\d.]+ \| ([\d.]+|–) \|", stdout), m
    # 32 wide: narrower than MIN_WIDTH, so the plain path whatever this machine measures
    assert "routes cpu_linear chooses on this machine for a float32 LM 32 wide: plain" in stdout
