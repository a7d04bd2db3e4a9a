"""The running app, driven through gradio_client: every named endpoint, streaming and stop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from served import serve

from blipdemo.decoding import INSTRUCTBLIP_DEFAULTS


@pytest.fixture(scope="module")
def served(checkpoint_dir):
    """The app on a random test checkpoint, launched in this process on a free loopback port."""
    folder = checkpoint_dir("instructblip", "llama")
    with serve("--model", str(folder), "--dtype", "float32", "--queue-size", "16") as (demo, _, url):
        yield demo, url, folder


@pytest.fixture(scope="module")
def model(served):
    import blipdemo

    return blipdemo.load(served[2], dtype="float32")


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False)


@pytest.fixture(scope="module")
def image_file(images, tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "stripes.png"
    images[1].save(path)
    return path


def test_endpoints_are_named_and_defaulted(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/ask", "/stream"} <= set(info)
    params = info["/ask"]["parameters"]
    assert params[0]["component"] == "Image" and params[1]["component"] == "Textbox"
    assert all(p["parameter_has_default"] for p in params[2:])


def test_ask_endpoint_matches_the_library(client, model, image_file):
    answer = client.predict(handle_file(str(image_file)), "Describe the image in detail.", api_name="/ask")
    d = INSTRUCTBLIP_DEFAULTS
    expected = model.ask(
        image_file,
        "Describe the image in detail.",
        num_beams=d["num_beams"],
        max_new_tokens=d["max_new_tokens"],
        min_new_tokens=d["min_new_tokens"],
        repetition_penalty=d["repetition_penalty"],
        length_penalty=d["length_penalty"],
        do_sample=False,
    )
    assert answer == expected


def test_ask_endpoint_with_options(client, model, image_file):
    answer = client.predict(handle_file(str(image_file)), "What color is it?", "Beam search", 1, 12, 0, api_name="/ask")
    assert answer == model.ask(
        image_file,
        "What color is it?",
        num_beams=1,
        max_new_tokens=12,
        min_new_tokens=0,
        repetition_penalty=1.5,
        length_penalty=1.0,
    )


def test_stream_endpoint_streams(client, model, image_file):
    job = client.submit(
        handle_file(str(image_file)), "Describe the image in detail.", "Nucleus sampling", 1, 40, 40, api_name="/stream"
    )
    outputs = list(job)
    assert len(outputs) > 1, "the answer should arrive in several increments"
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:], strict=False))


def test_bad_requests_get_clear_errors_and_the_next_one_is_served(client, model, image_file):
    with pytest.raises(Exception, match="Type a question"):
        client.predict(handle_file(str(image_file)), "   ", api_name="/ask")
    with pytest.raises(Exception, match="Upload an image"):
        client.predict(None, "What is this?", api_name="/ask")
    with pytest.raises(Exception, match="num_beams must be an integer from 1 to 10"):
        client.predict(handle_file(str(image_file)), "What?", "Beam search", 0, api_name="/ask")
    with pytest.raises(Exception, match="temperature must be"):
        client.predict(
            handle_file(str(image_file)), "What?", method="Nucleus sampling", temperature=1e9, api_name="/ask"
        )
    answer = client.predict(handle_file(str(image_file)), "What?", "Beam search", 1, 4, api_name="/ask")
    d = INSTRUCTBLIP_DEFAULTS
    assert answer == model.ask(
        image_file,
        "What?",
        num_beams=1,
        max_new_tokens=4,
        min_new_tokens=d["min_new_tokens"],
        repetition_penalty=d["repetition_penalty"],
        length_penalty=d["length_penalty"],
    )


def test_python_app_py_with_no_network_starts_on_the_embedded_model_and_answers_the_examples():
    """`python app.py` as the README says, on this offline machine: the banner, and right answers."""
    import json
    import os
    import subprocess
    import sys

    from served import free_port

    root = Path(__file__).resolve().parent.parent
    port = free_port()
    # Offline on purpose, with a hub cache that holds no model: the default checkpoint (several GB) is neither
    # downloaded nor taken from this machine's cache, so the app must fall back to the embedded model.
    env = {**os.environ, "BLIPDEMO_PORT": str(port), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["HF_HUB_CACHE"] = str(root / ".cache" / "empty-hub-cache")  # git-ignored; nothing can download into it
    env.pop("BLIPDEMO_MODEL", None)
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                client = Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert process.poll() is None, process.stdout.read()
                time.sleep(1)
        else:
            raise AssertionError("the app did not start")
        assert "embedded tiny model" in json.dumps(client.config)
        examples = json.loads((root / "assets" / "examples" / "examples.json").read_text())
        for example in examples:
            if example.get("history"):  # /ask takes one question; the two-turn example is the browser test's
                continue
            answer = client.predict(
                handle_file(str(root / "assets" / "examples" / example["image"])), example["question"], api_name="/ask"
            )
            assert answer.strip().lower() == example["answer"], (example, answer)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _component(config: dict, elem_id: str) -> dict:
    return next(c for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def test_blip2_prompts_as_written_through_the_app(checkpoint_dir, images, tmp_path):
    """On a BLIP-2 model the app shows the template switch, and /ask's `template` reaches the model: False sends the
    prompt exactly as typed (what the library answers with template=False), the default wraps it."""
    import blipdemo

    folder = checkpoint_dir("blip2", "opt")
    path = tmp_path / "noise.png"
    images[0].save(path)
    vlm = blipdemo.load(folder, dtype="float32")
    greedy = {"num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 1, "repetition_penalty": 1.5}
    with serve("--model", str(folder), "--dtype", "float32") as (_, _, url):
        client = Client(url, verbose=False)
        assert _component(client.config, "template")["props"]["visible"] is True
        for prompt in ("a photo of", "Q: what is it? A:"):
            as_typed = client.predict(
                handle_file(str(path)), prompt, "Beam search", 1, 8, template=False, api_name="/ask"
            )
            wrapped = client.predict(handle_file(str(path)), prompt, "Beam search", 1, 8, api_name="/ask")
            assert as_typed == vlm.ask(path, prompt, template=False, **greedy)
            assert wrapped == vlm.ask(path, prompt, **greedy)
            assert as_typed != wrapped, "the two prompts differ, so (on this random model) do the answers"


def test_instructblip_has_no_template_switch(client):
    assert _component(client.config, "template")["props"]["visible"] is False
