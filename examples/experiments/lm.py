"""Experiment 3: character-level language modelling on real text (PAPER.md §5, scaled down).

Bytes of the Python standard library's own source files (found via sysconfig; every 10th file
held out), or of any file given with --text. Bits per character (byte) on held-out text versus
the Transformer-PSM chunk size, against the softmax transformer and GLA with the same steps,
batches and parameter budget.

    python -m examples.experiments.lm [--quick] [--seed 0] [--text FILE]
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import common, report
from .data import TextCorpus, load_text, text_batch
from .models import MODEL_LABELS, build_model, non_embedding_params
from .train import TrainConfig, evaluate, smoothed, train

PAPER = ("WikiText-103 perplexity (GPT-2 base size, sequence 512): Transformer-PSM c = 32: 24.12; "
         "c = 256: 22.45; GPT-2: 22.28; Mamba: 24.7. Perplexity improves with the chunk size.")


@dataclass(frozen=True)
class LMConfig:
    chunks: tuple[int, ...] = (8, 32, 128)
    baselines: tuple[str, ...] = ("transformer", "gla")
    length: int = 256
    batch: int = 8
    steps: int = 250
    lr: float = 2e-3
    max_bytes: int = 3_000_000
    eval_windows: int = 64


QUICK = LMConfig(chunks=(8, 64), baselines=("transformer",), length=128, batch=8, steps=40,
                 max_bytes=400_000, eval_windows=16)


def variants(cfg: LMConfig) -> list[tuple[str, str, dict]]:
    return [(f"tpsm_c{c}", "tpsm", {"C": c}) for c in cfg.chunks] + [(b, b, {}) for b in cfg.baselines]


def label(name: str) -> str:
    kind, _, chunk = name.partition("_c")
    return MODEL_LABELS[kind] + (f" (C={chunk})" if chunk else "")


def train_one(name: str, kind: str, overrides: dict, corpus: TextCorpus, cfg: LMConfig, seed: int) -> dict:
    gen = common.seed_everything(seed)
    model = build_model(kind, vocab=TextCorpus.VOCAB, **overrides)
    next_batch = lambda step: text_batch(corpus.train, cfg.batch, cfg.length, gen)
    result = train(model, next_batch, TrainConfig(steps=cfg.steps, lr=cfg.lr), desc=f"LM {name}")
    eval_gen = torch.Generator().manual_seed(seed + 1)  # the same held-out windows for every model
    batches = [text_batch(corpus.valid, cfg.batch, cfg.length, eval_gen) for _ in range(cfg.eval_windows // cfg.batch)]
    metrics = evaluate(model, batches)
    return {"params": non_embedding_params(model), "losses": list(result.losses), "train_seconds": result.seconds,
            "bits_per_char": metrics["loss"] / math.log(2)}


def write_results(results: dict, corpus: TextCorpus, cfg: LMConfig, args) -> None:
    out, names = args.out, list(results)
    rows = [[label(n), results[n]["params"], f"{results[n]['train_seconds']:.0f}", results[n]["bits_per_char"]]
            for n in names]
    chunk_names = [n for n in names if n.startswith("tpsm_c")]
    series = {"Transformer-PSM": ([int(n.partition("_c")[2]) for n in chunk_names],
                                  [results[n]["bits_per_char"] for n in chunk_names])}
    for baseline in cfg.baselines:
        series[MODEL_LABELS[baseline]] = (list(cfg.chunks), [results[baseline]["bits_per_char"]] * len(cfg.chunks))
    report.line_plot(out / "lm_bpc.png", series, "Transformer-PSM chunk size C (baselines: flat lines)",
                     "held-out bits per character", "Language modelling: bits per character vs chunk size")
    report.line_plot(out / "lm_loss.png", {label(n): (list(range(cfg.steps)), smoothed(results[n]["losses"]))
                                           for n in names},
                     "step", "training loss (nats per byte, running mean)", "LM training loss")
    setup = (f"Text: {corpus.source}: {len(corpus.train):,} training bytes, {len(corpus.valid):,} held-out bytes "
             f"({corpus.ascii_fraction:.1%} ASCII, so bytes are characters). Byte vocabulary (256), sequence "
             f"length {cfg.length}, batch {cfg.batch}, {cfg.steps} AdamW steps, lr {cfg.lr}, seed {args.seed}; "
             f"evaluation on the same {cfg.eval_windows} held-out windows for every model.")
    report.write_report(
        out / "lm.md", "Character-level language modelling",
        "python -m examples.experiments.lm" + (" --quick" if args.quick else ""), PAPER,
        [("Setup", setup),
         ("Held-out bits per character", report.markdown_table(
             ["model", "non-embedding params", "train s", "bits/char"], rows) + "\n\n![bits per char](lm_bpc.png)"),
         ("Training loss", "![LM loss](lm_loss.png)")])
    common.save_json(out / "lm.json", {"config": asdict(cfg), "seed": args.seed, "results": results})


def main(argv=None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv,
                             extra=lambda p: p.add_argument("--text", type=Path, default=None))
    cfg = QUICK if args.quick else LMConfig()
    corpus = load_text(cfg.max_bytes, args.text)
    results = {name: train_one(name, kind, o, corpus, cfg, args.seed) for name, kind, o in variants(cfg)}
    write_results(results, corpus, cfg, args)
    print(f"wrote {args.out / 'lm.md'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
