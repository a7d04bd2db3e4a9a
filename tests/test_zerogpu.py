"""The app as a ZeroGPU Space runs it: under Hugging Face's own `spaces` package (requirements-dev.txt) in its ZeroGPU
mode, served by `python tests/zerogpu_app.py`.

What runs is the package's code: ``spaces.GPU`` asks the device API for a lease of ``gpu.answer_seconds(...)`` (through
``lease_seconds``) seconds — the duration callable, called with the call's own arguments — then runs the call in a
worker process forked once per decorated function and GPU and *kept* for the next call; the arguments are pickled
into it and each result out; closing a generator sets the worker's stop event, and the caller waits for one more item
before the lease is released. Only what needs Hugging Face's servers or CUDA is replaced: the device API by a local
stand-in (tests/zerogpu_api.py) whose record says what each call asked for and which worker ran it, and a new
worker's CUDA init and weight move by no-ops (tests/zerogpu_app.py). Through `/ask`, `/stream`, `/chat`, the map
settings' remap and the chat in Chromium: right answers, one reused worker with bounded memory, Stop, a killed
worker, leases that follow the arguments, and the package's quota refusal reaching the client.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import psutil
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from served import free_port
from small_detail_cases import cases, cropping
from zerogpu_api import DeviceAPI, Lease

from blipdemo import gpu

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
STEP = 0.05  # seconds each LM forward sleeps in the served app: long generations to stop in the middle
MiB = 2**20
TOO_LONG = "What is this? " * 250  # fits the app's limit on characters, not the embedded model's 256 tokens


@dataclass
class Space:
    url: str
    server: psutil.Process
    api: DeviceAPI  # the stand-in device API: its ``leases`` are every call's record
    costs: gpu.Costs  # what the app's start-up calibration measured (its leases follow them)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """`python tests/zerogpu_app.py` on the embedded model, against a stand-in device API served here."""
    api = DeviceAPI().start()
    port = free_port()
    log = tmp_path_factory.mktemp("zerogpu") / "app.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "SPACES_ZERO_GPU": "true",
        "SPACES_ZERO_DEVICE_API_URL": api.url,
    }
    app = str(ROOT / "tests" / "zerogpu_app.py")
    command = [sys.executable, app, "--slow-lm", str(STEP), "--dtype", "float32", "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = psutil.Process(process.pid)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert process.poll() is None, log.read_text()
                assert time.time() < deadline, "the app did not start"
                time.sleep(1)
        found = re.search(r"GPU costs of this model: Costs\((.*?)\)", log.read_text())
        assert found, f"the start-up calibration did not run in a worker:\n{log.read_text()}"
        costs = gpu.Costs(**{k: float(v) for k, v in re.findall(r"(\w+)=([^,]+)", found[1])})
        yield Space(url, server, api, costs)
    finally:
        # The package's workers wait for their next call: end them first (the launcher does on SIGTERM; a server
        # that died otherwise would leave them).
        kept = workers(server)
        for worker in kept:
            worker.terminate()
        psutil.wait_procs(kept, timeout=10)
        process.terminate()
        process.wait(timeout=30)
        api.close()
        print(f"\n--- app log: {log}")


@pytest.fixture(scope="module")
def client(space):
    return Client(space.url, verbose=False)


@pytest.fixture(scope="module")
def reference(space):
    """The plain library in this process (no `spaces` decorator at work here): the same embedded model, the served
    app's time limit and its measured costs. (model, its gpu key)."""
    import blipdemo
    from blipdemo.tiny import EMBEDDED_MODEL

    vlm = blipdemo.load(EMBEDDED_MODEL, dtype="float32")
    vlm.generation_time_limit = 120  # app.py's default --time-limit
    key = gpu.register(vlm)
    gpu.remember(key, space.costs)
    return vlm, key


def examples() -> list[dict]:
    return json.loads((EXAMPLES / "examples.json").read_text())


def one_turn_examples() -> list[dict]:
    return [e for e in examples() if not e.get("history")]  # /ask takes one question; two turns go through the chat


def workers(server: psutil.Process) -> list[psutil.Process]:
    return [p for p in server.children() if p.status() != psutil.STATUS_ZOMBIE]


def api_decoding(*given) -> tuple:
    """`/ask`'s and `/stream`'s decoding parameters after image and instruction, as the app fills the rest."""
    from blipdemo.decoding import INSTRUCTBLIP_DEFAULTS as D
    from blipdemo.ui.chat import BEAM

    names = ("num_beams", "max_new_tokens", "min_new_tokens", "top_p", "temperature", "repetition_penalty")
    defaults = (BEAM, *(D[n] for n in names), D["length_penalty"])
    return (*given, *defaults[len(given) :])


def answer_lease(reference, image: Path, instruction: str, *decoding, maps=None) -> int:
    """The lease an answer with these API arguments should ask for: ``gpu.answer_seconds`` for the question the app
    makes of them (``decoding``: the API's decoding parameters, ``api_decoding``)."""
    from blipdemo.ui.chat import decoding_fields

    vlm, key = reference
    question = vlm.question(image, instruction, maps=maps, **decoding_fields(*api_decoding(*decoding)))
    return gpu.answer_seconds(key, question)


def new_leases(space: Space, since: int) -> list[Lease]:
    return space.api.leases[since:]


def wait_for(condition, limit: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def visitor_token(name: str) -> str:
    """An X-IP-Token as ZeroGPU's proxy sets it for a visitor (a JWT; the package reads its payload only)."""
    payload = base64.urlsafe_b64encode(json.dumps({"user": name}).encode()).decode().rstrip("=")
    return f"e30.{payload}.signature"


def test_the_gpu_entry_point_takes_and_gives_picklable_values():
    """What crosses the fork: a model key, the checked Question (its picture decoded once), a run id; and back text,
    token ids and an Explanation without its picture."""
    import blipdemo
    from blipdemo.tiny import EMBEDDED_MODEL

    vlm = blipdemo.load(EMBEDDED_MODEL, dtype="float32")
    key = gpu.register(vlm)
    example = examples()[0]
    question = vlm.question(EXAMPLES / example["image"], example["question"], num_beams=1, maps={})
    arguments = (key, question, "r")
    copied = pickle.loads(pickle.dumps(arguments))
    assert copied == arguments and copied[1].picture.image.tobytes() == question.picture.image.tobytes()
    items = list(gpu.answer(*copied))
    for item in items:
        pickle.dumps(item)
    assert items[-3] == ("text", example["answer"])
    ids = vlm.generate_ids(EXAMPLES / example["image"], example["question"], num_beams=1).tolist()
    assert items[-2] == ("ids", ids)
    kind, maps = items[-1]
    assert kind == "maps" and maps.image is None and maps.tokens and maps.token_maps.shape[0] == len(maps.tokens)
    assert maps.text == example["answer"]


def test_ask_and_stream_answer_from_the_worker_with_the_leases_they_need(space, client, reference):
    """Each example through `/ask`, then `/stream` (greedy: piece by piece out of the worker). Every call asked the
    device API for ``gpu.answer_seconds`` of its own arguments, got it, and gave it back."""
    since = len(space.api.leases)
    expected = []
    for example in one_turn_examples():
        image = EXAMPLES / example["image"]
        answer = client.predict(handle_file(str(image)), example["question"], "Beam search", 1, api_name="/ask")
        assert answer == example["answer"], (example, answer)
        expected.append(answer_lease(reference, image, example["question"], "Beam search", 1))
    example = examples()[0]
    image = EXAMPLES / example["image"]
    pieces = list(client.submit(handle_file(str(image)), example["question"], api_name="/stream"))
    assert pieces[-1] == example["answer"]
    expected.append(answer_lease(reference, image, example["question"]))
    greedy = list(client.submit(handle_file(str(image)), example["question"], "Beam search", 1, api_name="/stream"))
    assert len(greedy) > 1 and greedy[-1] == example["answer"], "greedy answers stream out of the worker piece by piece"
    expected.append(answer_lease(reference, image, example["question"], "Beam search", 1))

    leases = new_leases(space, since)
    assert [lease.seconds for lease in leases] == expected
    assert all(lease.released and not lease.failed for lease in leases)
    assert len({lease.task for lease in leases}) == 1 and len({lease.pid for lease in leases}) == 1


def test_twenty_calls_in_a_row_run_on_one_reused_worker_with_bounded_memory(space, client, reference):
    """20 calls one after the other, `/ask` and `/chat` with maps in turn: each answer equals the library's own
    (`vlm.ask` in this process, same parameters), each lease ``gpu.answer_seconds`` of its call's arguments; every
    call ran on the same worker process, which no new one replaced (no new `/allow`); its resident memory and its
    threads stop growing after the first calls."""
    from blipdemo.ui.chat import decoding_fields
    from blipdemo.ui.maps import ALL, MapsPanel

    vlm, _ = reference
    cases = one_turn_examples()
    attention = ("Attention", ALL, ALL, ALL, ALL)
    expected = {
        e["question"]: vlm.ask(EXAMPLES / e["image"], e["question"], **decoding_fields(*api_decoding())) for e in cases
    }
    since = len(space.api.leases)
    leases, rss, uss, threads = [], [], [], []
    for i in range(20):
        example = cases[i % len(cases)]
        image, question = EXAMPLES / example["image"], example["question"]
        if i % 2:
            outputs = client.predict(
                handle_file(str(image)), question, [], True, True, False, *api_decoding(), *attention, api_name="/chat"
            )
            answer = outputs[0][-1]["content"][0]["text"]
            leases.append(answer_lease(reference, image, question, maps=MapsPanel.selection(*attention)))
        else:
            answer = client.predict(handle_file(str(image)), question, api_name="/ask")
            leases.append(answer_lease(reference, image, question))
        assert answer == expected[question], (i, example, answer)
        worker = psutil.Process(space.api.leases[-1].pid)
        memory = worker.memory_full_info()
        rss.append(memory.rss / MiB)
        uss.append(memory.uss / MiB)
        threads.append(worker.num_threads())
    recorded = new_leases(space, since)
    assert [lease.seconds for lease in recorded] == leases
    assert all(lease.released and not lease.failed for lease in recorded)
    assert len({lease.pid for lease in recorded}) == 1, "each call should reuse the worker the one before left"
    assert not any(lease.new_worker for lease in recorded[1:])
    print(f"\nworker {recorded[0].pid}: RSS MiB per call {[round(m, 1) for m in rss]}")
    print(f"worker {recorded[0].pid}: USS MiB per call {[round(m, 1) for m in uss]}")
    print(f"worker {recorded[0].pid}: threads per call {threads}")
    print(f"leases asked (s): {leases}")
    assert max(rss[4:]) - rss[4] < 32, f"the worker's memory grows with every call: {rss}"
    assert max(threads[4:]) <= threads[4], f"the worker's threads grow with every call: {threads}"


@pytest.mark.parametrize("method", ["Beam search", "Nucleus sampling"])
def test_stop_mid_answer_ends_the_call_in_the_worker_and_the_next_call_reuses_it(space, client, method):
    """Closing the generator is the only way to stop a ZeroGPU worker: the package sets the worker's stop event and
    waits for one more item before it releases the lease. That must come soon, even in a beam search (which sends
    nothing until its end: the entry point's heartbeat gives the worker a moment to notice), and leave the worker
    ready for the next call."""
    image = handle_file(str(EXAMPLES / "shapes-14.png"))
    since = len(space.api.leases)
    # At least 64 steps of STEP seconds: 3 s or more if nothing stops it.
    job = client.submit(image, "Describe the image.", method, 4, 200, 64, api_name="/stream")
    wait_for(lambda: len(space.api.leases) > since, what="the call's lease")
    lease = space.api.leases[since]
    time.sleep(1)
    assert lease.released is None, "the worker should still be generating a second in"
    cancelled = time.monotonic()
    job.cancel()  # Gradio's cancel awaits the cancelled handler, whose `finally` closes the call: it may be over here
    wait_for(lambda: lease.released is not None, limit=20, what="the lease to be released after the cancel")
    stopped = lease.released - cancelled
    print(f"\n{method}: lease released {stopped:.2f} s after the cancel")
    assert stopped < 3, f"the worker ended {stopped:.1f} s after the cancel (the heartbeat is 0.5 s, a step {STEP} s)"
    assert not lease.failed and psutil.pid_exists(lease.pid)

    example = examples()[3]
    answer = client.predict(handle_file(str(EXAMPLES / example["image"])), example["question"], api_name="/ask")
    assert answer == example["answer"]
    after = space.api.leases[-1]
    assert after.pid == lease.pid and not after.new_worker, "the stopped call's worker should serve the next call"


def test_a_killed_worker_fails_its_call_and_the_next_call_gets_a_new_worker(space, client):
    """A worker that dies mid-call (the OOM killer, a crash in CUDA): its call ends with the package's message, the
    lease is released as failed, and the next call is answered by a new worker."""
    image = handle_file(str(EXAMPLES / "shapes-14.png"))
    since = len(space.api.leases)
    job = client.submit(image, "Describe the image.", "Nucleus sampling", 1, 200, 64, api_name="/stream")
    wait_for(lambda: job.outputs(), what="the first piece of the answer")
    lease = space.api.leases[since]
    os.kill(lease.pid, signal.SIGKILL)
    with pytest.raises(Exception, match="GPU task aborted"):
        job.result(timeout=30)
    assert lease.released is not None and lease.failed

    example = examples()[2]
    answer = client.predict(handle_file(str(EXAMPLES / example["image"])), example["question"], api_name="/ask")
    assert answer == example["answer"]
    after = space.api.leases[-1]
    assert after.new_worker and after.pid != lease.pid and psutil.pid_exists(after.pid)


def test_bad_input_is_a_clear_message_and_the_next_request_is_served(space, client, tmp_path):
    """A bad image or parameter is refused at the edge, before any GPU is asked for; an instruction too long for the
    model is found in the worker, and its message crosses back."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    since = len(space.api.leases)
    with pytest.raises(Exception, match="not an image we can read"):
        client.predict(handle_file(str(broken)), "What color is the square?", api_name="/ask")
    with pytest.raises(Exception, match="num_beams must be"):
        client.predict(handle_file(str(EXAMPLES / "shapes-13.png")), "What?", "Beam search", 0, api_name="/ask")
    assert len(space.api.leases) == since, "a request refused at the edge should not ask for a GPU"

    with pytest.raises(Exception, match="too long for this model"):
        client.predict(handle_file(str(EXAMPLES / "shapes-13.png")), TOO_LONG, api_name="/ask")
    assert space.api.leases[-1].released is not None

    example = examples()[2]
    answer = client.predict(handle_file(str(EXAMPLES / example["image"])), example["question"], api_name="/ask")
    assert answer == example["answer"]


def test_a_user_error_in_the_worker_leaves_the_worker_for_the_next_call(space, client):
    """The package keeps a worker for the next call only when its call ended without raising: otherwise the next call
    forks a new worker, and the old one waits, idle, for good — one process (on a Space: with its CUDA context and
    the weights moved to it) per user error. So an error a user can cause comes back from the worker as a value
    (``gpu.on_gpu``) and is raised in the app's process: the message still reaches the client."""
    example = examples()[2]
    image = handle_file(str(EXAMPLES / example["image"]))
    assert client.predict(image, example["question"], api_name="/ask") == example["answer"]
    before = workers(space.server)
    with pytest.raises(Exception, match="too long for this model"):
        client.predict(image, TOO_LONG, api_name="/ask")
    assert client.predict(image, example["question"], api_name="/ask") == example["answer"]
    kept = {p.pid for p in before} & {p.pid for p in workers(space.server)}
    assert len(workers(space.server)) == len(before), f"workers before {before}, after {workers(space.server)}"
    assert not space.api.leases[-1].new_worker and space.api.leases[-1].pid in kept


def test_a_remap_after_an_answer_runs_on_the_same_worker_with_its_own_lease(space, client, reference):
    """A chat turn with maps (`/chat`), then another map method in the map settings: the app's remap event (private:
    called by its fn_index, as the page does) runs `gpu.remap` through the package, on the answers' worker (one
    decorated entry point: one worker, one copy of the weights), with a lease of ``gpu.REMAP_SECONDS``; the map it
    paints equals the one the plain library makes of the same answer."""
    from blipdemo.attention import map_selection
    from blipdemo.ui.maps import ALL, DISPLAY_SIDE, MapsPanel

    vlm, key = reference
    example = examples()[0]
    image = EXAMPLES / example["image"]
    attention, relevancy = ("Attention", ALL, ALL, ALL, ALL), ("Relevancy (gradients)", ALL, ALL, ALL, ALL)
    since = len(space.api.leases)
    chat = client.predict(
        handle_file(str(image)),
        example["question"],
        [],
        True,
        True,
        False,
        *api_decoding(),
        *attention,
        api_name="/chat",
    )[0]
    assert chat[-1]["content"][0]["text"] == example["answer"]

    remap = next(d for d in client.config["dependencies"] if d.get("api_name") == "follow_settings")
    client.endpoints[remap["id"]].is_valid = True  # a private event: the page calls it by its index
    heat, words, *_ = client.predict(None, *relevancy, fn_index=remap["id"])
    assert [w for w, _ in words["choices"][1:]] == example["answer"].split()

    answer, remapped = new_leases(space, since)
    assert answer.seconds == answer_lease(reference, image, example["question"], maps=MapsPanel.selection(*attention))
    assert remapped.released and not remapped.failed
    assert remapped.task == answer.task and remapped.pid == answer.pid and not remapped.new_worker, (
        "the remap forked a worker of its own (a second copy of the weights on a Space)"
    )
    # The plain library: the same answer, then its maps made again with relevancy.
    question = vlm.question(image, example["question"], maps=MapsPanel.selection(*attention))
    ids = dict(gpu.answer(key, question))["ids"]
    question = replace(question, maps=map_selection(vlm.model, **MapsPanel.selection(*relevancy)))
    assert remapped.seconds == gpu.lease_seconds(key, "remap", (question, ids), "run") == gpu.REMAP_SECONDS
    explanation = replace(gpu.remap(key, question, ids), image=question.picture.image)
    expected = np.asarray(explanation.overlay(max_side=DISPLAY_SIDE), dtype=int)
    served = np.asarray(Image.open(heat).convert("RGB"), dtype=int)
    assert served.shape == expected.shape and np.abs(served - expected).max() <= 2


def test_a_look_closer_turn_runs_its_whole_look_in_one_call_and_shows_where(space, client, reference, tmp_path):
    """A look-closer chat turn about a large photo with a small scene: the look, the crop and the answer run in the one
    GPU call, on the reused worker, under a lease that counts the look; the answer is the plain library's look-closer
    answer, and the page gets the picture with its box beside the crop. A remap with other layers then maps the same
    answer from the same crop (the crop travels with the shown answer)."""
    from blipdemo.ui.chat import decoding_fields
    from blipdemo.ui.maps import ALL, MapsPanel

    vlm, key = reference
    detail, question, _ = cropping(vlm, cases(20, seed=4, family="color"))
    path = tmp_path / "small-detail.png"
    detail.image.save(path)
    attention, layer_one = ("Attention", ALL, ALL, ALL, ALL), ("Attention", "1", ALL, ALL, ALL)
    asked = vlm.question(
        path, question, look_closer=True, maps=MapsPanel.selection(*attention), **decoding_fields(*api_decoding())
    )
    expected = vlm.decode(vlm.answer_ids(asked)[1])
    since = len(space.api.leases)
    job = client.submit(
        handle_file(str(path)), question, [], True, True, True, *api_decoding(), *attention, api_name="/chat"
    )
    outputs = job.result()
    assert outputs[0][-1]["content"][0]["text"] == expected
    # Among the turn's updates, one shows the look-closer view, with the painted pair as its value.
    views = [o[-1] for o in job.outputs() if isinstance(o[-1], dict) and o[-1].get("visible") is True]
    assert len(views) == 1, [o[-1] for o in job.outputs()]
    pair = Image.open(views[0]["value"])
    assert pair.size[0] > pair.size[1], "the picture with its box, and the crop beside it"
    (lease,) = new_leases(space, since)
    assert lease.released and not lease.failed
    assert lease.seconds == gpu.answer_seconds(key, asked) > answer_lease(reference, path, question)

    remap = next(d for d in client.config["dependencies"] if d.get("api_name") == "follow_settings")
    client.endpoints[remap["id"]].is_valid = True
    heat, words, *_ = client.predict(None, *layer_one, fn_index=remap["id"])
    assert [w for w, _ in words["choices"][1:]] == expected.split()
    *_, remapped = new_leases(space, since)
    assert remapped.released and not remapped.failed and remapped.pid == lease.pid


def test_a_call_over_the_visitors_quota_is_refused_with_the_packages_message(space, reference):
    """ZeroGPU refuses up front a call that asks for more seconds than the visitor has left; the package's message
    reaches the client, no worker runs, and a call that asks for less still passes: leases that ask for what the
    call needs (``gpu.answer_seconds``) let a visitor near the end of the quota still ask short questions."""
    token = visitor_token("near-the-end-of-the-quota")
    visitor = Client(space.url, verbose=False, headers={"X-IP-Token": token})
    example = examples()[1]
    image = EXAMPLES / example["image"]
    long, short = ("Beam search", 5, 512, 64), ("Beam search", 1, 8)
    asked = answer_lease(reference, image, "Describe the image.", *long)
    enough = answer_lease(reference, image, example["question"], *short)
    assert enough < asked, (enough, asked)
    space.api.quota[token] = asked - 1
    try:
        since = len(space.api.leases)
        message = rf"exceeded your ZeroGPU quota \({asked}s requested vs\. {asked - 1}s left\)"
        with pytest.raises(Exception, match=message) as refusal:
            visitor.predict(handle_file(str(image)), "Describe the image.", *long, api_name="/ask")
        print(f"\nrefused: {refusal.value}")
        (refused,) = new_leases(space, since)
        assert refused.refused and refused.token == token and refused.seconds == asked and refused.pid is None
        answer = visitor.predict(handle_file(str(image)), example["question"], *short, api_name="/ask")
        assert answer == example["answer"] and space.api.leases[-1].seconds == enough
    finally:
        space.api.quota.pop(token)


@pytest.mark.browser
def test_chat_in_the_browser_on_zerogpu(space):
    """A person clicks an example, presses Send, reads the answer and clicks a word of it."""
    from browser import click_example, launch, read_answer, skip_without_browser

    skip_without_browser()
    example = examples()[1]
    with launch() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(space.url)
        click_example(page, 1)
        page.locator("#send").click()
        assert read_answer(page, example["answer"]) == example["answer"]
        page.wait_for_selector("#words label", timeout=30_000)
        assert page.locator("#words label").all_inner_texts()[1:] == example["answer"].split()
        page.close()
