"""The app as a ZeroGPU Space runs it: `spaces.GPU` forks a worker per call, pickles the arguments into it and each
result out (the test double in tests/zerogpu keeps that contract). Through the chat in Chromium, `/ask` and
`/stream`, with the right answers; a Stop reaches the worker; nothing unpicklable crosses the fork."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from gradio_client import Client, handle_file
from served import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
STEP = 0.1  # seconds each LM forward sleeps in the served app: long generations to stop in the middle


@pytest.fixture(scope="module")
def space():
    """`python app.py` on the embedded model with the ZeroGPU double importable: (url, server process)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "tests" / "zerogpu_app.py"), "--slow-lm", str(STEP), "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert process.poll() is None, process.stdout.read()
                assert time.time() < deadline, "the app did not start"
                time.sleep(1)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(space):
    return Client(space[0], verbose=False)


def examples() -> list[dict]:
    return json.loads((EXAMPLES / "examples.json").read_text())


def workers(server: psutil.Process) -> list[psutil.Process]:
    return [p for p in server.children() if p.status() != psutil.STATUS_ZOMBIE]


def test_the_gpu_entry_point_takes_and_gives_plain_data():
    """What crosses the fork: a model key, a file path, text, pairs, numbers; and back text and numpy arrays."""
    import blipdemo
    from blipdemo import gpu
    from blipdemo.tiny import EMBEDDED_MODEL

    vlm = blipdemo.load(EMBEDDED_MODEL, dtype="float32")
    key = gpu.register(vlm)
    example = examples()[0]
    arguments = (key, str(EXAMPLES / example["image"]), example["question"], [], {"num_beams": 1}, True, True, "r")
    assert pickle.loads(pickle.dumps(arguments)) == arguments
    items = list(gpu.answer(*arguments))
    for item in items:
        pickle.dumps(item)
    assert items[-2] == ("text", example["answer"])
    kind, maps = items[-1]
    assert kind == "maps" and maps["tokens"] and maps["token_maps"].shape[0] == len(maps["tokens"])


def test_ask_and_stream_answer_through_forked_workers(space, client):
    url, server = space
    for example in examples():
        if example.get("history"):  # /ask takes one question; the two-turn example goes through the chat
            continue
        image = handle_file(str(EXAMPLES / example["image"]))
        answer = client.predict(image, example["question"], "Beam search", 1, api_name="/ask")
        assert answer == example["answer"], (example, answer)
    example = examples()[0]
    pieces = list(client.submit(handle_file(str(EXAMPLES / example["image"])), example["question"], api_name="/stream"))
    assert pieces[-1] == example["answer"]
    image = handle_file(str(EXAMPLES / example["image"]))
    greedy = list(client.submit(image, example["question"], "Beam search", 1, api_name="/stream"))
    assert len(greedy) > 1 and greedy[-1] == example["answer"], "greedy answers stream out of the worker piece by piece"
    time.sleep(1)
    assert not workers(server), "each call's worker ends with its call"


def test_bad_input_is_a_clear_message_and_the_next_request_is_served(client, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(Exception, match="not an image we can read"):
        client.predict(handle_file(str(broken)), "What color is the square?", api_name="/ask")
    with pytest.raises(Exception, match="num_beams must be"):
        client.predict(handle_file(str(EXAMPLES / "shapes-13.png")), "What?", "Beam search", 0, api_name="/ask")
    example = examples()[2]
    assert (
        client.predict(handle_file(str(EXAMPLES / example["image"])), example["question"], api_name="/ask")
        == (example["answer"])
    )


@pytest.mark.parametrize("method", ["Beam search", "Nucleus sampling"])
def test_cancel_reaches_the_worker(space, client, method):
    """Closing the generator is the only way to stop a ZeroGPU worker; it must stop a beam search too (which sends
    nothing until its end: the entry point's heartbeat gives the worker a moment to notice)."""
    _, server = space
    image = handle_file(str(EXAMPLES / "shapes-14.png"))
    # At least 64 steps of STEP seconds: ~6 s or more if nothing stops it.
    job = client.submit(image, "Describe the image.", method, 4, 200, 64, api_name="/stream")
    deadline = time.time() + 30
    while not workers(server) and time.time() < deadline:
        time.sleep(0.05)
    assert workers(server), "the generation should run in a worker process"
    time.sleep(2)
    assert workers(server), "the worker should still be generating two seconds in"
    job.cancel()
    cancelled = time.perf_counter()
    while workers(server) and time.perf_counter() - cancelled < 20:
        time.sleep(0.05)
    gone = time.perf_counter() - cancelled
    assert not workers(server), "the worker kept generating after the cancel"
    assert gone < 3, f"the worker ended {gone:.1f} s after the cancel (the heartbeat is 0.5 s, a step {STEP} s)"


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_chat_in_the_browser_on_zerogpu(space):
    """A person clicks an example, presses Send, reads the answer and clicks a word of it."""
    from browser import click_example, launch, read_answer

    example = examples()[1]
    with launch() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(space[0])
        click_example(page, 1)
        page.locator("#send").click()
        assert read_answer(page, example["answer"]) == example["answer"]
        page.wait_for_selector("#words label", timeout=30_000)
        assert page.locator("#words label").all_inner_texts()[1:] == example["answer"].split()
        page.close()
