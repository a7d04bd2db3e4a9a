"""Streaming load: many visitors chatting at once through the chat event, maps on, big photos and small pictures mixed.

    python benchmarks/load_stream.py [--clients 8] [--rounds 3] [--large 4] [--max-batch-size 8 | --concurrency 4]
                                     [--step 0.04] [--megapixels 12]

Serves the app in this process as `python app.py` does (loopback only) and sends every client's questions through
`/chat` — the page's chat turn: the same question and the same outputs as pressing Send — with `gradio_client`,
streaming, maps on. Each client shows its own scene (blipdemo.tiny.scenes, docs/scenes.md): ``--large`` of them as
a JPEG photo of ``--megapixels`` (the scene upscaled: the model still sees it as 224 pixels, but the app decodes,
keeps and paints the photo), the others as small PNGs. ``--step`` slows every LM step to about a real model's pace
on a GPU (in seconds; 0: the embedded model's own pace). Each client asks ``--rounds`` questions in a row (a new
chat each round), all clients at once.

Every streamed answer is compared with the same question asked alone afterwards (``vlm.ask``, the same decoding):
- cut short: the answer is a strict beginning of the alone answer (a generation stopped early);
- differs: any other difference;
- maps missing: a non-empty answer whose maps never came.
Also p50/p95 time to the first token and to the last map, from each submit. Exits non-zero on any cut-short,
differing or map-missing answer, or a failed request. Bounded in count (clients × rounds) and time (``--timeout``).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402
from served import serve  # noqa: E402
from speed import describe_machine, machine  # noqa: E402

from blipdemo.decoding import INSTRUCTBLIP_DEFAULTS  # noqa: E402
from blipdemo.tiny import EMBEDDED_MODEL, scenes  # noqa: E402

SEED = 4_000
D = INSTRUCTBLIP_DEFAULTS
# The page's decoding controls (method, beams, max new, min new, top-p, temperature, repetition, length), greedy so
# that an answer alone is the reference, and the map settings (method, then each hop's layer and head: all).
DECODING = ["Beam search", 1, 48, D["min_new_tokens"], D["top_p"], D["temperature"], D["repetition_penalty"], 1.0]
MAP_SETTINGS = ["Attention", "All (mean)", "All (mean)", "All (mean)", "All (mean)"]
ASKED_ALONE = dict(num_beams=1, max_new_tokens=48, min_new_tokens=D["min_new_tokens"], length_penalty=1.0)
ASKED_ALONE["repetition_penalty"] = D["repetition_penalty"]


def pictures(count: int, large: int, megapixels: float, folder: Path, seed: int) -> list[dict]:
    """One distinct scene per client, each with a question per family in turn; ``large`` of them as big JPEGs."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < count:
        scene = scenes.sample_scene(rng)
        if scene in seen:
            continue
        seen.add(scene)
        picture = scenes.render(scene, rng)
        if len(out) < large:  # a phone photo's size: aspect 4:3
            width = round(math.sqrt(megapixels * 1e6 * 4 / 3))
            path = folder / f"client-{len(out):02d}.jpg"
            picture.resize((width, width * 3 // 4), Image.BICUBIC).save(path, quality=90)
        else:
            path = folder / f"client-{len(out):02d}.png"
            picture.save(path)
        families = [f for f in scenes.SINGLE_TURN if scenes.can_ask(scene, f)]
        questions = [scenes.ask(scene, families[i % len(families)], rng)[0] for i in range(8)]
        out.append({"image": path, "questions": questions, "large": len(out) < large})
    return out


def nearest_rank(values: list[float], q: float) -> float:
    return sorted(values)[max(0, math.ceil(q * len(values)) - 1)] if values else float("nan")


def _answer_text(chat) -> str:
    if not chat:
        return ""
    content = chat[-1].get("content") if isinstance(chat[-1], dict) else None
    if isinstance(content, list):  # Gradio returns message content as [{"type": "text", "text": …}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def one_turn(client: Client, image: Path, question: str, timeout: float) -> dict:
    """One chat turn through /chat, streamed: the final answer, whether its maps came, and the timings."""
    start = time.perf_counter()
    first = maps_at = None
    answer, heat = "", None
    job = client.submit(
        handle_file(str(image)), question, [], True, True, False, *DECODING, *MAP_SETTINGS, api_name="/chat"
    )
    seen = 0
    while True:  # polled, not iterated: a turn whose stream never ends must still end here, at the timeout
        done = job.done()
        outputs = job.outputs()
        # chat, instruction, heat-map, words, query gallery, region (the states and the panel are not sent)
        for output in outputs[seen:]:
            if first is None and _answer_text(output[0]):
                first = time.perf_counter() - start
            answer = _answer_text(output[0]) or answer
            if output[2] and isinstance(output[2], str):  # the heat-map's file: the maps came
                heat, maps_at = output[2], time.perf_counter() - start
        seen = len(outputs)
        if done:
            job.result()  # raises what the call raised
            break
        if time.perf_counter() - start > timeout:
            job.cancel()
            raise TimeoutError(f"no whole answer in {timeout:g} s")
        time.sleep(0.01)
    return {"answer": answer.strip(), "heat": heat, "first": first, "maps_at": maps_at}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", type=int, default=None, help="clients with a big photo (default: half)")
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--step", type=float, default=0.0, help="seconds added to every LM step (a real model's pace)")
    parser.add_argument("--model", default=str(EMBEDDED_MODEL))
    parser.add_argument("--timeout", type=float, default=600, help="seconds each turn waits for its answer")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    large = args.clients // 2 if args.large is None else args.large
    print(describe_machine(machine("cpu", torch.float32, (1024,))))
    with tempfile.TemporaryDirectory(prefix="blipdemo-stream-") as folder:
        work = pictures(args.clients, large, args.megapixels, Path(folder), args.seed)
        return run(args, work)


def run(args, work: list[dict]) -> int:
    flags = ["--model", args.model, "--max-batch-size", str(args.max_batch_size)]
    flags += ["--concurrency", str(args.concurrency), "--queue-size", str(4 * args.clients)]
    with serve(*flags) as (_, vlm, url):
        if args.step:
            forward = vlm.language_model.forward

            def slow_forward(*a, **k):
                time.sleep(args.step)
                return forward(*a, **k)

            vlm.language_model.forward = slow_forward
        with ThreadPoolExecutor(args.clients) as pool:
            clients = list(pool.map(lambda _: Client(url, verbose=False), range(args.clients)))
        ready = threading.Barrier(args.clients)

        def visitor(i: int) -> list[dict]:
            ready.wait()  # all start at once
            turns = []
            for r in range(args.rounds):
                question = work[i]["questions"][r % len(work[i]["questions"])]
                try:
                    turn = one_turn(clients[i], work[i]["image"], question, args.timeout)
                except Exception as e:  # noqa: BLE001 - every outcome is classified
                    turn = {"failed": f"{type(e).__name__}: {e}"}
                turns.append({"client": i, "question": question, **turn})
            return turns

        began = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [turn for turns in pool.map(visitor, range(args.clients)) for turn in turns]
        wall = time.perf_counter() - began
        if args.step:
            vlm.language_model.forward = forward
        for turn in results:  # the same question alone, after the load
            turn["alone"] = vlm.ask(str(work[turn["client"]]["image"]), turn["question"], **ASKED_ALONE)

    failed = [t for t in results if "failed" in t]
    answered = [t for t in results if "failed" not in t]
    cut = [t for t in answered if t["answer"] != t["alone"] and t["alone"].startswith(t["answer"])]
    differ = [t for t in answered if t["answer"] != t["alone"] and t not in cut]
    no_maps = [t for t in answered if t["answer"] and not t["heat"]]
    print(f"| client | picture | question | answer | alone | first token | last map |\n|{'---|' * 7}")
    for t in results:
        kind = "photo" if work[t["client"]]["large"] else "small"
        if "failed" in t:
            print(f"| {t['client']} | {kind} | {t['question']} | failed: {t['failed']} | {t['alone']} | — | — |")
            continue
        first = f"{t['first']:.2f} s" if t["first"] is not None else "—"
        last = f"{t['maps_at']:.2f} s" if t["maps_at"] is not None else "no maps"
        print(f"| {t['client']} | {kind} | {t['question']} | {t['answer']} | {t['alone']} | {first} | {last} |")
    firsts = [t["first"] for t in answered if t["first"] is not None]
    lasts = [t["maps_at"] for t in answered if t["maps_at"] is not None]
    fmt = lambda v: f"{v:.2f} s" if v == v else "—"  # noqa: E731 - NaN → —
    p50 = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    print(
        f"\n| clients | rounds | photos | max batch | concurrency | LM step | answers | cut short | differ | "
        f"maps missing | failed | first token p50 / p95 | last map p50 / p95 | wall |\n|{'---|' * 14}\n"
        f"| {args.clients} | {args.rounds} | {sum(w['large'] for w in work)} × {args.megapixels:g} MP | "
        f"{args.max_batch_size} | {args.concurrency} | {args.step * 1000:.0f} ms | {len(answered)} | {len(cut)} | "
        f"{len(differ)} | {len(no_maps)} | {len(failed)} | {fmt(p50(firsts))} / {fmt(nearest_rank(firsts, 0.95))} | "
        f"{fmt(p50(lasts))} / {fmt(nearest_rank(lasts, 0.95))} | {wall:.1f} s |"
    )
    bad = len(cut) + len(differ) + len(no_maps) + len(failed)
    if bad:
        print(f"FAILED: {len(cut)} cut short, {len(differ)} differ, {len(no_maps)} without maps, {len(failed)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
