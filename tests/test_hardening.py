"""Hazards against the running app: each gets its defence, and the next ordinary request is still served."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
import torch
from conftest import OFFLINE
from gradio_client import Client, handle_file
from hazards import REFUSED, VALID, build
from PIL import Image
from served import freed_after, generating, serve, wait_for_generation

from blipdemo.decode_loop import RunningBatch

QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def app(checkpoint_dir):
    folder = checkpoint_dir("instructblip", "llama")
    with serve(
        "--model",
        str(folder),
        "--dtype",
        "float32",
        "--queue-size",
        "16",
        "--max-file-size",
        "1mb",
        "--time-limit",
        "60",
    ) as (demo, vlm, url):
        yield vlm, url


@pytest.fixture(scope="module")
def client(app):
    return Client(app[1], verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory, images):
    found = build(tmp_path_factory.mktemp("hazards"))
    for i, image in enumerate(images):
        found[f"ok-{i}.png"] = tmp_path_factory.getbasetemp() / f"ok-{i}.png"
        image.save(found[f"ok-{i}.png"])
    return found


def ask(client, path, text=QUESTION, **options):
    options = {"num_beams": 1, "max_new_tokens": 6, **options}
    return client.predict(handle_file(str(path)), text, api_name="/ask", **options)


def served_next(client, files, vlm):
    """The next ordinary request gets the right answer."""
    expected = vlm.ask(
        files["ok-0.png"], QUESTION, num_beams=1, max_new_tokens=6, repetition_penalty=1.5, min_new_tokens=1
    )
    assert ask(client, files["ok-0.png"]) == expected


@pytest.mark.parametrize(
    "text,message",
    [("", "Type a question"), ("   \n\t", "Type a question"), ("x" * 200_000, "too long")],
)
def test_bad_instructions(app, client, files, text, message):
    with pytest.raises(Exception, match=message):
        ask(client, files["ok-0.png"], text)
    served_next(client, files, app[0])


def test_special_tokens_are_plain_text(app, client, files):
    """Through the app, typed special tokens get the library's answer to the same text, which reads them as plain
    text (tests/test_generation.py checks the ids: no <image>, EOS or [SEP] among them)."""
    vlm = app[0]
    for text in ["<image> </s> [SEP] [CLS] <s> <pad> [PAD]", "</s></s></s>"]:
        expected = vlm.ask(
            files["ok-1.png"], text, num_beams=1, max_new_tokens=6, repetition_penalty=1.5, min_new_tokens=1
        )
        assert ask(client, files["ok-1.png"], text) == expected
    served_next(client, files, vlm)


@pytest.mark.parametrize("name,message", REFUSED.items())
def test_bad_image_files(app, client, files, name, message):
    with pytest.raises(Exception, match=message):
        ask(client, files[name])
    served_next(client, files, app[0])


@pytest.mark.parametrize("name", VALID)
def test_unusual_images_are_answered(app, client, files, name):
    assert ask(client, files[name]) == app[0].ask(
        files[name], QUESTION, num_beams=1, max_new_tokens=6, repetition_penalty=1.5, min_new_tokens=1
    )


def test_upload_over_the_size_limit(app, client, files, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, 3 * 2**20, dtype=np.uint8).tobytes())
    with pytest.raises(Exception, match="(?i)too large|exceeds|size"):
        ask(client, big)
    served_next(client, files, app[0])


# NaN cannot travel as JSON (gradio_client refuses it client-side); the library test covers NaN.
@pytest.mark.parametrize(
    "options,name",
    [
        ({"temperature": 1e9, "method": "Nucleus sampling"}, "temperature"),
        ({"num_beams": 0}, "num_beams"),
        ({"max_new_tokens": 10**6}, "max_new_tokens"),
        ({"top_p": 5, "method": "Nucleus sampling"}, "top_p"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"method": "greedy-ish"}, "method"),
        ({"template": "false"}, "template must be True or False"),  # never quietly true
    ],
)
def test_out_of_range_decoding_before_any_model_work(app, client, files, options, name):
    vlm = app[0]
    calls = vlm.vision_calls
    with pytest.raises(Exception, match=name):
        ask(client, files["ok-2.png"], **options)
    assert vlm.vision_calls == calls
    served_next(client, files, vlm)


def test_out_of_memory_gives_a_message_and_frees(app, client, files, monkeypatch):
    vlm = app[0]

    def exhausted(*args, **kwargs):  # the LM's forward, which every decoding path calls
        held = torch.empty(10_000_000)  # what the failing step held
        del held
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(vlm.language_model, "forward", exhausted)
    with pytest.raises(Exception, match="ran out of memory"):
        ask(client, files["ok-0.png"])
    with pytest.raises(Exception, match="ran out of memory"):
        ask(client, files["ok-0.png"], num_beams=2)  # beam search, through generate
    monkeypatch.undo()
    assert not generating()
    served_next(client, files, vlm)


def test_wall_clock_limit(app, client, files, monkeypatch):
    """With a 1 s limit, a long generation ends at 1 s (within one decoding step), cut short, and the client gets
    exactly the tokens generated until then."""
    vlm = app[0]
    _slow_down(vlm, monkeypatch)  # the LM's room (~240 tokens) at 40 ms a step is ~10 s; unslowed it ends in < 1 s
    calls = []  # (start, end) of every LM forward: the prefill, then one per step
    slow_forward = vlm.language_model.forward

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        out = slow_forward(*args, **kwargs)
        calls.append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(vlm.language_model, "forward", timed_forward)
    chosen = []  # the tokens the decode loop picked, in order (one row)
    choose = RunningBatch._choose

    def recorded(rows, logits):
        tokens = choose(rows, logits)
        chosen.extend(tokens.tolist())
        return tokens

    monkeypatch.setattr(RunningBatch, "_choose", staticmethod(recorded))
    monkeypatch.setattr(vlm, "generation_time_limit", 1.0)
    room = vlm.prepare(
        vlm.question(files["ok-1.png"], QUESTION, max_new_tokens=2000)
    ).max_new_tokens  # the LM's limit caps 2000
    answer = ask(client, files["ok-1.png"], max_new_tokens=2000, min_new_tokens=2000, method="Nucleus sampling")
    seconds = calls[-1][1] - calls[0][0]
    assert len(chosen) == len(calls), "one token per forward: the prefill's, then one per step"
    assert len(chosen) < room, "the time limit, not the token limit, must end it"
    # The clock starts at the row's prefill and is read after every step (40 ms here)
    assert 1.0 <= seconds < 1.5, f"the generation ran {seconds:.2f} s under a 1 s limit"
    assert answer == vlm.tokenizer.decode(chosen, skip_special_tokens=True).strip()  # every token until then
    monkeypatch.undo()
    served_next(client, files, vlm)


@pytest.mark.parametrize(
    "path",
    [
        "gradio_api/file=/etc/passwd",
        "gradio_api/file=../../../../etc/passwd",
        "gradio_api/file=%2Fetc%2Fpasswd",
        "gradio_api/file=..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "gradio_api/file=/proc/self/environ",
        "file=/etc/passwd",
        "gradio_api/file=assets/../app.py",
        "gradio_api/file=%2e%2e/%2e%2e/etc/passwd",
    ],
)
def test_file_access_is_refused(app, path):
    response = httpx.get(app[1] + path, timeout=10)
    assert response.status_code in (403, 404, 400), (path, response.status_code)
    assert "root:" not in response.text


def test_assets_are_served_and_monitoring_is_off(app):
    import app as app_module

    example = next((app_module.ASSETS / "examples").glob("*.png"))
    assert httpx.get(app[1] + f"gradio_api/file={example}", timeout=10).status_code == 200
    assert httpx.get(app[1] + "monitoring", timeout=10).status_code in (403, 404)


def test_rest_api_goes_through_the_queue(app, files):
    """A valid request (uploaded image, question, every option) is refused on the direct REST routes that
    ``api_open=False`` closes (gradio 6.31 routes.py: POST /run/{api_name} and /api/{api_name}), and the very same
    request through the queue (POST /call/ask, then its event stream) is answered with the library's answer."""
    vlm, url = app
    with open(files["ok-0.png"], "rb") as f:
        path = httpx.post(url + "gradio_api/upload", files={"files": f}, timeout=30).json()[0]
    image = {"path": path, "meta": {"_type": "gradio.FileData"}}
    # method, beams, max/min new tokens, top-p, temperature, repetition and length penalty, template
    data = [image, QUESTION, "Beam search", 1, 6, 1, 0.9, 1.0, 1.5, 1.0, True]
    expected = vlm.ask(
        files["ok-0.png"], QUESTION, num_beams=1, max_new_tokens=6, min_new_tokens=1, repetition_penalty=1.5
    )
    for route in ("gradio_api/api/ask", "gradio_api/run/ask"):
        response = httpx.post(url + route, json={"data": data}, timeout=60)
        assert response.status_code == 404 and "join the queue" in response.text, (route, response.text)
    event = httpx.post(url + "gradio_api/call/ask", json={"data": data}, timeout=30).json()["event_id"]
    stream = httpx.get(url + f"gradio_api/call/ask/{event}", timeout=60).text
    kinds = [line.removeprefix("event: ") for line in stream.splitlines() if line.startswith("event: ")]
    payloads = [line.removeprefix("data: ") for line in stream.splitlines() if line.startswith("data: ")]
    assert kinds[-1] == "complete", stream
    assert json.loads(payloads[-1]) == [expected]


def test_thirty_clients_against_a_queue_of_sixteen(app, files):
    vlm, url = app
    names = ["ok-0.png", "ok-1.png", "ok-2.png"]
    expected = {
        n: vlm.ask(files[n], QUESTION, num_beams=1, max_new_tokens=24, min_new_tokens=24, repetition_penalty=1.5)
        for n in names
    }
    assert len(set(expected.values())) == 3
    rss = psutil.Process().memory_info().rss

    def one(i):
        name = names[i % 3]
        try:
            got = Client(url, verbose=False).predict(
                handle_file(str(files[name])),
                QUESTION,
                num_beams=1,
                max_new_tokens=24,
                min_new_tokens=24,
                api_name="/ask",
            )
            return "answered" if got == expected[name] else f"wrong: {got!r}"
        except Exception as e:  # noqa: BLE001 - we classify every outcome
            return "queue full" if "queue" in str(e).lower() and "full" in str(e).lower() else f"error: {e}"

    with ThreadPoolExecutor(30) as pool:
        outcomes = list(pool.map(one, range(30), timeout=300))
    assert all(o in ("answered", "queue full") for o in outcomes), outcomes
    assert outcomes.count("answered") >= 16
    served_next(Client(url, verbose=False), files, vlm)
    grown = (psutil.Process().memory_info().rss - rss) / 2**20
    assert grown < 200, f"memory grew by {grown:.0f} MiB"


MAP_DEFAULTS = ["Attention", "All (mean)", "All (mean)", "All (mean)", "All (mean)"]  # method, each hop's layer, head


def test_two_simultaneous_users_get_their_own_answer_and_heatmap(app, files):
    """Two chat sessions at once, different images: each sees its own answer and its own map."""
    vlm, url = app
    options = ["Beam search", 1, 8, 1, 0.9, 1.0, 1.5, 1.0]  # method, beams, max/min new, top-p, temp, rep, len

    def chat(name):
        client = Client(url, verbose=False)
        # image, instruction, chat, show maps, template, options, map settings → chat, instruction, heat, …
        picture = handle_file(str(files[name]))
        outputs = client.predict(picture, QUESTION, [], True, True, False, *options, *MAP_DEFAULTS, api_name="/chat")
        chat_out, heat = outputs[0], outputs[2]
        content = chat_out[-1]["content"]  # Gradio returns message content as [{"type": "text", "text": …}]
        text = "".join(part["text"] for part in content) if isinstance(content, list) else content
        return text, np.asarray(Image.open(heat))

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(["ok-0.png", "ok-1.png"], pool.map(chat, ["ok-0.png", "ok-1.png"]), strict=True))
    decoding = dict(num_beams=1, max_new_tokens=8, min_new_tokens=1, repetition_penalty=1.5, length_penalty=1.0)
    for name, (answer, heat) in results.items():
        assert answer == vlm.ask(files[name], QUESTION, **decoding)
        # The app maps the ids it generated (not the answer's text tokenized again): so does explain without answer=.
        own = np.asarray(vlm.explain(files[name], QUESTION, **decoding).overlay())
        assert heat.shape == own.shape and np.abs(heat.astype(int) - own.astype(int)).max() <= 1
    a, b = (results[n][1] for n in ("ok-0.png", "ok-1.png"))
    assert a.shape != b.shape or np.abs(a.astype(int) - b.astype(int)).max() > 1


def _slow_down(vlm, monkeypatch):
    real_forward = vlm.language_model.forward

    def slow_forward(*args, **kwargs):  # ~40 ms a token, like a real LM on a CPU: a long generation
        time.sleep(0.04)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(vlm.language_model, "forward", slow_forward)
    return real_forward


def test_a_client_that_cancels_frees_the_model_within_a_second(app, files, monkeypatch):
    """Two seconds into a long generation the client cancels its job."""
    vlm, url = app
    real_forward = _slow_down(vlm, monkeypatch)
    client = Client(url, verbose=False)
    job = client.submit(
        handle_file(str(files["ok-0.png"])), QUESTION, "Nucleus sampling", 1, 2000, 2000, api_name="/stream"
    )
    time.sleep(2)
    assert generating(), "the generation should still be running two seconds in"
    job.cancel()
    freed = freed_after()
    assert not generating() and freed < 1.0, f"generation still ran {freed:.2f} s after the client left"
    monkeypatch.setattr(vlm.language_model, "forward", real_forward)
    served_next(Client(url, verbose=False), files, vlm)


@pytest.mark.parametrize("method", ["Beam search", "Nucleus sampling"])
def test_a_client_that_vanishes_frees_the_model_within_a_second(app, files, monkeypatch, method):
    """Two seconds into a long generation the client's process dies: no cancel, its connection just drops.

    Beam search is the hard case: it sends nothing until the end, so nothing is written to the dead connection.
    """
    vlm, url = app
    real_forward = _slow_down(vlm, monkeypatch)
    client_code = (
        "import time\n"
        "from gradio_client import Client, handle_file\n"
        f"job = Client({url!r}, verbose=False).submit(handle_file({str(files['ok-0.png'])!r}), {QUESTION!r}, "
        f"{method!r}, 3, 2000, 2000, api_name='/ask')\n"
        "time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", client_code], env={**os.environ, **OFFLINE})
    try:
        wait_for_generation()
        time.sleep(2)
        assert generating(), "the generation should still be running two seconds in"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    freed = freed_after()
    assert not generating() and freed < 1.0, f"generation still ran {freed:.2f} s after the client died"
    monkeypatch.setattr(vlm.language_model, "forward", real_forward)
    served_next(Client(url, verbose=False), files, vlm)


def test_a_rest_client_that_hangs_up_frees_the_model_within_a_second(app, files, monkeypatch):
    """The plain HTTP API (POST /gradio_api/call/ask, then its event stream), closed two seconds in."""
    vlm, url = app
    real_forward = _slow_down(vlm, monkeypatch)
    with open(files["ok-0.png"], "rb") as f:
        path = httpx.post(url + "gradio_api/upload", files={"files": f}).json()[0]
    image = {"path": path, "meta": {"_type": "gradio.FileData"}}
    data = [image, QUESTION, "Beam search", 3, 2000, 2000, 0.9, 1.0, 1.5, 1.0, True]  # every input, template last
    event = httpx.post(url + "gradio_api/call/ask", json={"data": data}).json()["event_id"]
    with httpx.stream("GET", url + f"gradio_api/call/ask/{event}", timeout=30):
        wait_for_generation()
        time.sleep(2)
        assert generating(), "the generation should still be running two seconds in"
    freed = freed_after()
    assert not generating() and freed < 1.0, f"generation still ran {freed:.2f} s after the hang-up"
    monkeypatch.setattr(vlm.language_model, "forward", real_forward)
    served_next(Client(url, verbose=False), files, vlm)
