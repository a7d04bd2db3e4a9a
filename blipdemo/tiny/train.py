"""Train the embedded tiny InstructBLIP on the shapes scenes (docs/scenes.md) and save it in the HF layout.

    python -m blipdemo.tiny.train --out assets/shapes-instructblip

Recipe (the numbers chose it; see the README):
1. Pre-render scenes once over the spec's whole range (sizes, jitter, anti-aliasing, PNG/JPEG, other image
   sizes), through the checkpoint's own image processor.
2. Stage 1, the vision side (as BLIP-2 starts from a pretrained image encoder): the ViT alone, with
   throw-away linear heads on its output tokens. Every patch token learns which cell it lies in, what
   object (shape, color) that cell holds and whether the patch is on the object; the CLS token learns the
   object count. So the tokens carry *what* and *where* — a ViT taught only attributes forgets where.
3. Stage 2, InstructBLIP's own training: the ViT frozen (its tokens pre-computed once), the Q-Former,
   query tokens, projection and LLaMA LM trained with the language-modeling loss on the answers of every
   question family (version 2: absent objects, relations and follow-ups too). Half the questions come after
   up to ``history_turns`` earlier turns of the same chat, built into the prompt by ``blipdemo.prompts``
   exactly as the app builds it; the saved config says so, and the app keeps that many turns.
   No loss ever touches attention weights: the maps must earn their localization.
4. Stage 3, framing: a crop that look-closer cuts around a small detail holds the scene with a margin of
   background, and a model taught only on scenes that fill the picture reads such a crop poorly. So the whole
   model (the ViT unfrozen, with fresh per-patch heads that also learn "outside the scene") trains on a mix:
   half the batch as in stages 1-2, half Version 1 scenes pasted into a canvas of up to ``framing_max`` times
   their side (the background gray around them) and asked the questions that do not depend on the picture's
   frame. ``framing_max`` stays under 3: Version 3 pictures (3 to 6 times) judge look-closer and are never
   trained on. ``framing_rounds`` cosine cycles (warm restarts), each with fresh heads and fresh framed scenes.

Stage 3 alone, from a saved checkpoint (what made the shipped one: see the README):

    python -m blipdemo.tiny.train --init <stages 1-2 checkpoint> --out <dir>            # all its rounds
    python -m blipdemo.tiny.train --init <dir> --first-round N --framing-rounds M --out <dir 2>
                                                         # from a checkpoint with N rounds done, up to round M

Per-family exact-match accuracy on held-out scenes is logged as training goes (teacher-forced: every
answer token is the argmax ⇔ greedy decoding returns exactly the answer).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import (
    BlipImageProcessorPil,
    GenerationConfig,
    InstructBlipConfig,
    InstructBlipProcessor,
    LlamaConfig,
    LlamaForCausalLM,
)

from ..model import VisionLanguageModel
from ..prompts import build_prompt
from ..service import Service
from . import scenes
from .tokenizers import lm_tokenizer, wordpiece_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Ordinary English beside the scene vocabulary, so the tokenizers read a user's free text sensibly.
ENGLISH = (
    "the a an of and to in is it you that he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part picture photo image describe show tell me please color colour shape "
    "where why which object objects thing things left right top bottom middle center centre corner above "
    "below next beside near big small large tiny background gray grey white black brown pink dark light "
    "circle square triangle rectangle star dot ball box red green blue yellow purple orange yes no three"
)


@dataclass
class TinyConfig:
    image_size: int = 108  # the 3×3 cells are exactly 3×3 patches of 12 px
    patch_size: int = 12
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    qformer_width: int = 128
    qformer_layers: int = 2
    qformer_heads: int = 4
    num_query_tokens: int = 16
    lm_width: int = 192
    lm_layers: int = 3
    lm_heads: int = 4
    lm_vocab: int = 600
    train_scenes: int = 20000
    eval_scenes: int = 600
    vit_steps: int = 2500
    vit_lr: float = 1e-3
    qa_steps: int = 9000
    qa_lr: float = 5e-4
    warmup: int = 200
    batch_size: int = 64
    eval_every: int = 1000  # as the shipped checkpoint was trained (its training_log.json records the config)
    framing_steps: int = 2000
    framing_lr: float = 2e-4
    framing_scenes: int = 8000
    framing_max: float = 2.0  # canvas side / scene side, drawn uniformly in [1, framing_max]
    framing_share: float = 0.5  # of each stage-3 batch
    framing_rounds: int = 4
    framing_eval_every: int = 250
    history_turns: int = 2  # earlier chat turns a question may come after (and the app keeps)
    seed: int = 0


# Stage-2 share of each family: the version-2 skills (and relations most) need more examples than the rest.
FAMILY_WEIGHTS = {
    "color": 1.0,
    "shape": 1.0,
    "count": 0.7,
    "where": 1.0,
    "exists": 1.0,
    "describe": 1.0,
    "absent": 1.3,
    "relation": 1.6,
    "follow-up": 1.4,
}


# Stage-3 families of a framed scene: those whose answer does not depend on where the picture's frame is.
FRAMED_WEIGHTS = {"color": 1.0, "shape": 1.0, "count": 0.7, "exists": 1.0, "absent": 1.3}
OUTSIDE = 9  # stage-3 cell label of a patch outside the scene


@dataclass(frozen=True)
class Frame:
    """Where a 224-px scene lies in its picture: top-left corner and the (square) picture's side, px."""

    x0: int = 0
    y0: int = 0
    side: int = scenes.SIZE


def framed(scene: scenes.Scene, rng: random.Random, max_scale: float) -> tuple[Image.Image, Frame]:
    """The scene pasted at a random place into a square canvas of its own gray, side 224..224·max_scale."""
    side = round(scenes.SIZE * rng.uniform(1.0, max_scale))
    canvas = Image.new("RGB", (side, side), (scene.background,) * 3)
    frame = Frame(rng.randint(0, side - scenes.SIZE), rng.randint(0, side - scenes.SIZE), side)
    canvas.paste(scenes.render(scene, rng), (frame.x0, frame.y0))
    return canvas, frame


# --------------------------------------------------------------------------------------------------
# Data
def render_set(
    n: int, seed: int, processor, framing_max: float = 1.0
) -> tuple[list[scenes.Scene], list[Frame], torch.Tensor]:
    """``n`` scenes, where each lies in its picture, and the pixel values (n, 3, S, S) as float16.

    With ``framing_max`` > 1 each scene is pasted into a larger canvas (``framed``); the pictures then go
    through ``scenes.degrade`` and the checkpoint's own image processor either way.
    """
    rng = random.Random(seed)
    all_scenes, frames, chunks, images = [], [], [], []
    for _ in tqdm(range(n), desc=f"render (seed {seed})", leave=False):
        scene = scenes.sample_scene(rng)
        all_scenes.append(scene)
        if framing_max > 1.0:
            image, frame = framed(scene, rng, framing_max)
        else:
            image, frame = scenes.render(scene, rng), Frame()
        frames.append(frame)
        images.append(scenes.degrade(image, rng))
        if len(images) == 500:
            chunks.append(processor(images=images, return_tensors="pt")["pixel_values"].half())
            images = []
    if images:
        chunks.append(processor(images=images, return_tensors="pt")["pixel_values"].half())
    return all_scenes, frames, torch.cat(chunks)


def plain_sets(cfg: TinyConfig, processor) -> tuple[tuple, tuple]:
    """Stages 1-2's scenes, as every stage uses them: (training scenes, their pixel values, their per-patch labels)
    and (held-out scenes, their pixel values)."""
    train_scenes, _, train_pix = render_set(cfg.train_scenes, cfg.seed * 1000 + 1, processor)
    eval_scenes, _, eval_pix = render_set(cfg.eval_scenes, cfg.seed * 1000 + 2, processor)
    targets = [patch_targets(s, cfg.image_size // cfg.patch_size) for s in train_scenes]
    return (train_scenes, train_pix, targets), (eval_scenes, eval_pix)


def patch_targets(scene: scenes.Scene, grid: int, frame: Frame = Frame()) -> dict[str, torch.Tensor]:
    """Per-patch cell / shape / color / on-object labels and the count, for the stage-1 and stage-3 heads.

    A patch whose centre lies outside the scene (only in a framed picture) has cell ``OUTSIDE`` and no object.
    """
    step = frame.side / grid
    cell_size = scenes.SIZE / 3
    by_cell = {o.cell: o for o in scene.objects}
    cell, shape, color, on = (torch.zeros(grid * grid, dtype=torch.long) for _ in range(4))
    for r in range(grid):
        for c in range(grid):
            x, y = (c + 0.5) * step - frame.x0, (r + 0.5) * step - frame.y0  # in the scene's own pixels
            i = r * grid + c
            if not (0 <= x < scenes.SIZE and 0 <= y < scenes.SIZE):
                cell[i] = OUTSIDE
                continue
            cell_index = int(y // cell_size) * 3 + int(x // cell_size)
            cell[i] = cell_index
            obj = by_cell.get(scenes.CELLS[cell_index])
            if obj is not None:
                shape[i] = 1 + scenes.SHAPES.index(obj.shape)
                color[i] = 1 + list(scenes.COLORS).index(obj.color)
                x0, y0, x1, y1 = obj.box
                on[i] = int(x0 <= x < x1 and y0 <= y < y1)
    return {"cell": cell, "shape": shape, "color": color, "on": on, "count": torch.tensor(len(scene.objects) - 1)}


class VisionHeads(nn.Module):
    """Throw-away stage-1 heads; not part of the checkpoint."""

    def __init__(self, width: int, cells: int = 9) -> None:
        super().__init__()
        self.cell, self.shape, self.color, self.on = (nn.Linear(width, k) for k in (cells, 4, 7, 2))
        self.count = nn.Linear(width, 3)

    def losses(self, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        patches, cls = tokens[:, 1:].float(), tokens[:, 0].float()  # (B, P, D), (B, D)
        total, accs = 0.0, {}
        for name in ("cell", "shape", "color", "on"):
            logits = getattr(self, name)(patches)  # (B, P, k)
            total = total + F.cross_entropy(logits.flatten(0, 1), targets[name].flatten())
            accs[name] = (logits.argmax(-1) == targets[name]).float().mean().item()
        logits = self.count(cls)
        total = total + F.cross_entropy(logits, targets["count"])
        accs["count"] = (logits.argmax(-1) == targets["count"]).float().mean().item()
        return total, accs


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --------------------------------------------------------------------------------------------------
# Model
def build_model(cfg: TinyConfig, tokenizer, qformer_tokenizer) -> Service:
    grid = cfg.image_size // cfg.patch_size
    assert grid * cfg.patch_size == cfg.image_size
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.lm_width,
        intermediate_size=cfg.lm_width * 8 // 3,
        num_hidden_layers=cfg.lm_layers,
        num_attention_heads=cfg.lm_heads,
        num_key_value_heads=cfg.lm_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    config = InstructBlipConfig(
        vision_config=dict(
            hidden_size=cfg.vision_width,
            intermediate_size=cfg.vision_width * 4,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            layer_norm_eps=1e-6,
        ),
        qformer_config=dict(
            hidden_size=cfg.qformer_width,
            intermediate_size=cfg.qformer_width * 4,
            num_hidden_layers=cfg.qformer_layers,
            num_attention_heads=cfg.qformer_heads,
            cross_attention_frequency=1,
            encoder_hidden_size=cfg.vision_width,
            vocab_size=len(qformer_tokenizer),
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=qformer_tokenizer.pad_token_id,
        ),
        text_config=text.to_dict(),
        num_query_tokens=cfg.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = VisionLanguageModel(config, LlamaForCausalLM(text))
    with torch.no_grad():  # BERT/ViT-style init where PyTorch's default is not what these layers expect
        for name, p in model.named_parameters():
            if name.startswith("language_model"):
                continue
            if (
                name.endswith(("class_embedding", "position_embedding", "query_tokens"))
                or "embeddings." in name
                or p.dim() == 2
            ):
                nn.init.trunc_normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
    return Service(model, tokenizer, qformer_tokenizer)


def build_tokenizers(seed: int):
    rng = random.Random(seed + 7)
    corpus = [ENGLISH] * 20
    words = set(ENGLISH.split())
    for _ in range(3000):
        scene = scenes.sample_scene(rng)
        for family in scenes.FAMILIES:
            if not scenes.can_ask(scene, family):
                continue
            d = scenes.dialogue(scene, family, rng, variant=False)
            text = " ".join(f"{q} {a}" for q, a in (*d.history, (d.question, d.answer)))
            corpus.append(text)
            words.update(w.strip("?.,").lower() for w in text.split())
    return corpus, sorted(words)


def sample_dialogue(scene: scenes.Scene, family: str, rng: random.Random, max_turns: int) -> scenes.Dialogue:
    """A training question: alone half the time, otherwise after 1..max_turns earlier turns of the chat."""
    turns = 0 if rng.random() < 0.5 else rng.randint(1, max_turns)
    if family != "follow-up":
        return scenes.dialogue(scene, family, rng, earlier=turns)
    turns = max(turns, 1)  # the turn it follows, maybe after follow-ups of its own or an unrelated turn
    chain = rng.randint(0, turns - 1)
    return scenes.dialogue(scene, family, rng, earlier=turns - 1 - chain, chain=chain)


# --------------------------------------------------------------------------------------------------
# Stage 2 batches
def qa_batch(vlm: Service, items: list[scenes.Dialogue]) -> dict[str, torch.Tensor]:
    """Token ids for questions in their chats: LM ids = prompt + answer + EOS, labels only on the answer.

    The prompt (earlier turns, then the question) is built and tokenized as ``VisionLanguageModel.prepare``
    does for the app, for the LM and the Q-Former alike.
    """
    tok, qtok = vlm.tokenizer, vlm.qformer_tokenizer
    prompts = [build_prompt(vlm.family, d.question.strip(), d.history) for d in items]
    q = qtok(prompts, padding=True, return_tensors="pt", split_special_tokens=True)
    rows, labels = [], []
    for prompt_text, d in zip(prompts, items, strict=True):
        prompt = tok(prompt_text, split_special_tokens=True)["input_ids"]
        target = tok(" " + d.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)], lab[i, : len(lb)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(lb), 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": lab,
        "qformer_input_ids": q["input_ids"],
        "qformer_attention_mask": q["attention_mask"],
    }


def exact_match(vlm: Service, out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: every answer token is the argmax (⇔ greedy decoding yields exactly the answer)."""
    q = vlm.config.num_query_tokens
    pred = out.logits[:, q - 1 : -1].argmax(-1)  # position t predicts token t of input_ids
    labels = batch["labels"]
    ok = (pred == labels) | (labels == -100)
    return ok.all(dim=1)


def sample_items(
    all_scenes: list[scenes.Scene], k: int, rng: random.Random, max_turns: int
) -> tuple[list[int], list[scenes.Dialogue]]:
    """``k`` stage-2 training questions: families by ``FAMILY_WEIGHTS``, a scene that has each, the question in
    its chat (``sample_dialogue``). Returns the scenes' indices and the dialogues."""
    families = rng.choices(list(FAMILY_WEIGHTS), weights=list(FAMILY_WEIGHTS.values()), k=k)
    idx = [pick_scenes(all_scenes, family, 1, rng)[0] for family in families]
    items = [sample_dialogue(all_scenes[i], family, rng, max_turns) for i, family in zip(idx, families, strict=True)]
    return idx, items


def scores(accs: dict[str, float]) -> str:
    """An evaluation's accuracies as one log line: "color 1.00  shape 0.99 …"."""
    return "  ".join(f"{k} {v:.2f}" for k, v in accs.items() if k != "step")


def pick_scenes(all_scenes: list[scenes.Scene], family: str, n: int, rng: random.Random) -> list[int]:
    """``n`` random indices of scenes that have a question of ``family`` (relations need two objects)."""
    picked = []
    while len(picked) < n:
        i = rng.randrange(len(all_scenes))
        if scenes.can_ask(all_scenes[i], family):
            picked.append(i)
    return picked


def evaluate_teacher_forced(
    vlm, feats, eval_scenes, seed: int, max_turns: int, per_family: int = 100
) -> dict[str, float]:
    rng = random.Random(seed)
    vlm.model.eval()
    result = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for family in scenes.FAMILIES:
            idx = pick_scenes(eval_scenes, family, per_family, rng)
            items = [sample_dialogue(eval_scenes[i], family, rng, max_turns) for i in idx]
            batch = qa_batch(vlm, items)
            out = vlm(image_embeds=feats[idx].float(), **batch)
            result[family] = exact_match(vlm, out, batch).float().mean().item()
    vlm.model.train()
    return result


# --------------------------------------------------------------------------------------------------
def train(cfg: TinyConfig, out_dir: Path) -> dict:
    if cfg.history_turns < 1:
        raise ValueError("history_turns must be at least 1: a follow-up needs the turn it follows.")
    start = time.time()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    corpus, words = build_tokenizers(cfg.seed)
    tokenizer = lm_tokenizer(corpus, vocab_size=cfg.lm_vocab, style="llama", max_length=256)
    qformer_tokenizer = wordpiece_tokenizer(words, max_length=128)
    image_processor = BlipImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    processor = InstructBlipProcessor(
        image_processor, tokenizer, qformer_tokenizer, num_query_tokens=cfg.num_query_tokens
    )
    tokenizer = processor.tokenizer  # with the <image> placeholder the transformers processor adds
    vlm = build_model(cfg, tokenizer, qformer_tokenizer)
    vlm.image_processor = image_processor
    print(f"parameters: {sum(p.numel() for p in vlm.model.parameters()) / 1e6:.2f} M")

    plain, plain_eval = plain_sets(cfg, image_processor)
    (train_scenes, train_pix, targets), (eval_scenes, eval_pix) = plain, plain_eval
    stacked = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
    print(f"rendered {len(train_scenes)} + {len(eval_scenes)} scenes in {time.time() - start:.0f} s")

    # Stage 1: the ViT with per-patch heads.
    heads = VisionHeads(cfg.vision_width)
    params = list(vlm.model.vision_model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vit_lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.vit_steps), desc="stage 1 (ViT)")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.vit_steps, cfg.vit_lr, cfg.warmup)
        idx = torch.randint(len(train_scenes), (cfg.batch_size,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = vlm.model.vision_model(train_pix[idx].float())
        loss, accs = heads.losses(tokens, {k: v[idx] for k, v in stacked.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.2f}" for k, v in accs.items()})
    stage1 = accs

    # Stage 2: freeze the ViT, pre-compute its tokens, train Q-Former + projection + LM on the answers.
    vlm.model.vision_model.requires_grad_(False).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        train_feats = torch.cat(
            [vlm.model.vision_model(train_pix[i : i + 500].float()).bfloat16() for i in range(0, len(train_pix), 500)]
        )
        eval_feats = torch.cat(
            [vlm.model.vision_model(eval_pix[i : i + 500].float()).bfloat16() for i in range(0, len(eval_pix), 500)]
        )
    params = [p for n, p in vlm.model.named_parameters() if not n.startswith("vision_model")]
    opt = torch.optim.AdamW(params, lr=cfg.qa_lr, weight_decay=0.01)
    rng = random.Random(cfg.seed + 3)
    history = []
    bar = tqdm(range(cfg.qa_steps), desc="stage 2 (Q-Former + LM)")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.qa_steps, cfg.qa_lr, cfg.warmup)
        idx, items = sample_items(train_scenes, cfg.batch_size, rng, cfg.history_turns)
        batch = qa_batch(vlm, items)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = vlm(image_embeds=train_feats[idx].float(), **batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.qa_steps:
            accs = evaluate_teacher_forced(vlm, eval_feats, eval_scenes, cfg.seed + 5, cfg.history_turns)
            history.append({"step": step + 1, **accs})
            tqdm.write(f"step {step + 1}: {scores(accs)}")

    framing = framing_stage(vlm, cfg, plain, plain_eval)
    minutes = (time.time() - start) / 60
    # What the app reads to decide how many earlier turns go into a prompt (no special case for this model).
    vlm.config.blipdemo = {"history_turns": cfg.history_turns}
    save(vlm, processor, out_dir)
    report = {
        "config": asdict(cfg),
        "stage1": stage1,
        "history": history,
        "framing": framing,
        "minutes": round(minutes, 1),
    }
    (out_dir / "training_log.json").write_text(json.dumps(report, indent=1))
    print(f"saved {out_dir} after {minutes:.1f} min")
    return report


# --------------------------------------------------------------------------------------------------
# Stage 3: framing
def framed_dialogue(scene: scenes.Scene, family: str, rng: random.Random) -> scenes.Dialogue:
    """A single-turn question about a framed scene, of a family in ``FRAMED_WEIGHTS``.

    Absent objects are asked in their color and shape forms only: "Where is …" names a cell of the scene, and
    in a framed picture the scene's cells are not the picture's.
    """
    while True:
        d = scenes.dialogue(scene, family, rng, earlier=0)
        if not d.question.lower().startswith("where"):
            return d


def framing_stage(vlm: Service, cfg: TinyConfig, plain: tuple, plain_eval: tuple, first_round: int = 0) -> dict:
    """Stage 3: the whole model on plain and framed scenes (see the module docstring); returns its log.

    ``framing_rounds`` rounds, each a cosine cycle of ``framing_steps`` with fresh heads and fresh framed scenes
    (warm restarts: one cycle's decay is where the framed families gain most). ``plain`` is (scenes, pixel values,
    per-patch labels) and ``plain_eval`` (scenes, pixel values), as stages 1-2 used them. Every random draw comes
    from generators seeded by ``cfg.seed`` and the round, so a round draws the same data and heads whether it
    follows the one before in one run or starts from its saved checkpoint (``--init`` with ``--first-round``).
    """
    if cfg.framing_steps <= 0 or first_round >= cfg.framing_rounds:
        return {"rounds": []}
    if not 1.0 < cfg.framing_max < 3.0:
        raise ValueError("framing_max must lie in (1, 3): Version 3 pictures (3x-6x) are never trained on.")
    framed_eval = render_set(300, cfg.seed * 1000 + 32, vlm.image_processor, cfg.framing_max)
    rounds = []
    for r in range(first_round, cfg.framing_rounds):
        history = framing_round(vlm, cfg, r, plain, plain_eval, framed_eval)
        rounds.append({"round": r + 1, "history": history})
    vlm.model.requires_grad_(False)
    vlm.model.eval()
    return {"rounds": rounds}


def framing_round(vlm: Service, cfg: TinyConfig, r: int, plain: tuple, plain_eval: tuple, framed_eval) -> list:
    """One stage-3 cycle (round ``r``, from 0); returns its evaluations, before it and every so many steps."""
    grid = cfg.image_size // cfg.patch_size
    framed_scenes, framed_frames, framed_pix = render_set(
        cfg.framing_scenes, cfg.seed * 1000 + 31 + 10 * r, vlm.image_processor, cfg.framing_max
    )
    plain_scenes, plain_pix, plain_targets = plain
    framed_targets = [patch_targets(s, grid, f) for s, f in zip(framed_scenes, framed_frames, strict=True)]

    torch.manual_seed(cfg.seed + 13 + r)
    heads = VisionHeads(cfg.vision_width, cells=OUTSIDE + 1)
    model = vlm.model
    model.requires_grad_(True)
    model.train()
    # The fresh heads learn at stage 1's rate; the trained model moves at a fine-tune's. Each is clipped on
    # its own, so the heads' large early gradients do not shrink the model's steps.
    params, head_params = list(model.parameters()), list(heads.parameters())
    opt = torch.optim.AdamW(
        [{"params": params, "peak": cfg.framing_lr}, {"params": head_params, "peak": cfg.vit_lr}], weight_decay=0.01
    )
    rng = random.Random(cfg.seed + 17 + r)
    n_framed = round(cfg.batch_size * cfg.framing_share)
    history = [{"step": 0, **framing_eval(vlm, cfg, plain_eval, framed_eval)}]
    name = f"framing round {r + 1}"
    tqdm.write(f"{name} step 0: {scores(history[-1])}")
    bar = tqdm(range(cfg.framing_steps), desc=f"stage 3 ({name})")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.framing_steps, g["peak"], cfg.warmup)
        p_idx, items = sample_items(plain_scenes, cfg.batch_size - n_framed, rng, cfg.history_turns)
        families = rng.choices(list(FRAMED_WEIGHTS), weights=list(FRAMED_WEIGHTS.values()), k=n_framed)
        f_idx = [rng.randrange(len(framed_scenes)) for _ in families]
        items += [framed_dialogue(framed_scenes[i], family, rng) for i, family in zip(f_idx, families, strict=True)]
        pix = torch.cat([plain_pix[p_idx], framed_pix[f_idx]]).float()  # (B, 3, S, S)
        targets = [plain_targets[i] for i in p_idx] + [framed_targets[i] for i in f_idx]
        targets = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
        batch = qa_batch(vlm, items)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = model.vision_model(pix)  # (B, 1 + P, Dv)
            out = vlm(image_embeds=tokens, **batch)
        head_loss, _ = heads.losses(tokens, targets)
        loss = out.loss + head_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.nn.utils.clip_grad_norm_(head_params, 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(lm=f"{out.loss.item():.3f}", heads=f"{head_loss.item():.3f}")
        if (step + 1) % cfg.framing_eval_every == 0 or step + 1 == cfg.framing_steps:
            history.append({"step": step + 1, **framing_eval(vlm, cfg, plain_eval, framed_eval)})
            tqdm.write(f"{name} step {step + 1}: {scores(history[-1])}")
    return history


def framing_eval(vlm: Service, cfg: TinyConfig, plain_eval: tuple, framed_eval: tuple) -> dict[str, float]:
    """Teacher-forced exact match: every family on plain scenes, and the framed families on framed ones."""
    model = vlm.model
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain_feats = torch.cat(
            [model.vision_model(plain_eval[1][i : i + 300].float()) for i in range(0, len(plain_eval[1]), 300)]
        )
        result = evaluate_teacher_forced(vlm, plain_feats, plain_eval[0], cfg.seed + 5, cfg.history_turns)
        f_scenes, _, f_pix = framed_eval
        f_feats = model.vision_model(f_pix.float())
        rng = random.Random(cfg.seed + 19)
        for family in FRAMED_WEIGHTS:
            idx = [rng.randrange(len(f_scenes)) for _ in range(100)]
            batch = qa_batch(vlm, [framed_dialogue(f_scenes[i], family, rng) for i in idx])
            out = vlm(image_embeds=f_feats[idx].float(), **batch)
            result[f"framed {family}"] = exact_match(vlm, out, batch).float().mean().item()
    model.train(was_training)
    return {k: round(v, 3) for k, v in result.items()}


def framing_from(cfg: TinyConfig, init: Path, out_dir: Path, first_round: int = 0) -> dict:
    """Stage 3 alone, from a saved checkpoint (``--init``): stages 1-2's, or (``first_round`` > 0) the one that
    many rounds of stage 3 saved. Renders stages 1-2's scenes, trains the remaining rounds, saves.

    The checkpoint's ``training_log.json`` is kept, with these rounds added to it.
    """
    from ..api import load

    start = time.time()
    before = json.loads((init / "training_log.json").read_text())
    done = before.get("framing", {}).get("rounds", [])
    if [r["round"] for r in done] != list(range(1, first_round + 1)):
        raise ValueError(f"{init} has stage-3 rounds {[r['round'] for r in done]}, not the {first_round} asked for")
    vlm = load(str(init), dtype="float32")
    processor = InstructBlipProcessor.from_pretrained(init)
    framing = framing_stage(vlm, cfg, *plain_sets(cfg, vlm.image_processor), first_round)
    save(vlm, processor, out_dir)
    minutes = (time.time() - start) / 60
    for r in framing["rounds"]:
        r.update({"from": str(init), "minutes": round(minutes / len(framing["rounds"]), 1)})
    report = {**before, "config": asdict(cfg), "framing": {"rounds": [*done, *framing["rounds"]]}}
    (out_dir / "training_log.json").write_text(json.dumps(report, indent=1))
    print(f"saved {out_dir} after {minutes:.1f} min (stage 3)")
    return report


def save(vlm: Service, processor, out_dir: Path) -> None:
    """Write the checkpoint in the published InstructBLIP layout (what save_pretrained writes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {"query_tokens": vlm.model.query_tokens}
    for prefix, module in vlm.model.core_modules().items():
        state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    state.update({f"language_model.{k}": v for k, v in vlm.language_model.state_dict().items()})
    save_file(
        {k: v.detach().float().contiguous() for k, v in state.items()},
        out_dir / "model.safetensors",
        metadata={"format": "pt"},
    )
    vlm.config.save_pretrained(out_dir)
    tok = vlm.tokenizer
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/shapes-instructblip"))
    parser.add_argument("--init", type=Path, help="run stage 3 alone, from this checkpoint")
    parser.add_argument("--first-round", type=int, default=0, help="with --init: stage-3 rounds it has done")
    for name, value in asdict(TinyConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    cfg = TinyConfig(**{k: getattr(args, k) for k in asdict(TinyConfig())})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.init is not None:
        framing_from(cfg, args.init, args.out, args.first_round)
    else:
        train(cfg, args.out)


if __name__ == "__main__":
    main()
