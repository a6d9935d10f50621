"""Experiment 1: S5 state tracking (PAPER.md §5), plus S3 as a scaled-down proxy.

Tokens are random permutations of 5 items; the label at each position is the composition so far
(120 classes). Train on lengths 4-18 with a growing-length curriculum, evaluate the accuracy of
the LAST position (the whole composition) at lengths 18, 26, ..., 162. The full mode repeats
the protocol on S3 (6 classes, the smallest non-abelian group), which a CPU budget can learn.

    python -m examples.experiments.s5 [--quick] [--seed 0] [--models tpsm,transformer,mamba]
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace

import torch

from . import common, report
from .data import S3, S5, PermutationGroup, group_batch
from .models import MODEL_LABELS, build_model, non_embedding_params
from .train import TrainConfig, evaluate, smoothed, train

PAPER = ("Transformer-PSM (chunk 1) keeps low error up to about length 160-180, roughly 9x the "
         "training length; GPT-2 and Mamba collapse beyond the training length (18).")

GROUPS = {"S5": S5, "S3": S3}


@dataclass(frozen=True)
class S5Config:
    # (group, training steps): S5 gets fewer because no model learns it at this budget anyway
    groups: tuple[tuple[str, int], ...] = (("S5", 600), ("S3", 1500))
    models: tuple[str, ...] = ("tpsm", "transformer", "mamba")
    batch: int = 32
    lr: float = 2e-3
    min_length: int = 4
    train_length: int = 18
    curriculum_fraction: float = 0.4  # the max length grows 4 -> 18 over this part of training
    eval_lengths: tuple[int, ...] = tuple(range(18, 163, 8))
    eval_rows: int = 128


QUICK = S5Config(groups=(("S5", 120),), eval_lengths=(18, 34, 66, 162), eval_rows=32)


def curriculum_length(step: int, steps: int, cfg: S5Config, gen: torch.Generator) -> int:
    ramp = min(1.0, step / max(1, cfg.curriculum_fraction * steps))
    top = round(cfg.min_length + ramp * (cfg.train_length - cfg.min_length))
    return int(torch.randint(cfg.min_length, top + 1, (1,), generator=gen))


def train_one(group: PermutationGroup, steps: int, kind: str, cfg: S5Config, seed: int) -> dict:
    gen = common.seed_everything(seed)
    model = build_model(kind, vocab=group.size, **({"C": 1} if kind == "tpsm" else {}))
    next_batch = lambda step: group_batch(group, cfg.batch, curriculum_length(step, steps, cfg, gen), gen)
    result = train(model, next_batch, TrainConfig(steps=steps, lr=cfg.lr), desc=f"{group.name} {kind}")
    eval_gen = torch.Generator().manual_seed(seed + 1)
    rows = min(cfg.eval_rows, 64)
    per_length = {length: evaluate(model, [group_batch(group, rows, length, eval_gen)
                                           for _ in range(max(1, cfg.eval_rows // rows))])
                  for length in cfg.eval_lengths}
    return {"params": non_embedding_params(model), "losses": list(result.losses),
            "train_seconds": result.seconds, "eval": per_length}


def group_sections(name: str, results: dict, cfg: S5Config, out) -> list[tuple[str, str]]:
    kinds = list(results)
    labels = [MODEL_LABELS[k] + (" (C=1)" if k == "tpsm" else "") for k in kinds]
    acc = lambda k, n, metric: results[k]["eval"][n][metric]
    last_rows = [[n] + [acc(k, n, "last_accuracy") for k in kinds] for n in cfg.eval_lengths]
    token_rows = [[n] + [acc(k, n, "accuracy") for k in kinds] for n in cfg.eval_lengths]
    model_rows = [[MODEL_LABELS[k], results[k]["params"], f"{results[k]['train_seconds']:.0f}",
                   f"{sum(results[k]['losses'][-50:]) / len(results[k]['losses'][-50:]):.3f}"] for k in kinds]
    stem = name.lower()
    report.line_plot(out / f"{stem}_accuracy.png",
                     {lab: (list(cfg.eval_lengths), [acc(k, n, "last_accuracy") for n in cfg.eval_lengths])
                      for lab, k in zip(labels, kinds)},
                     "sequence length", "last-position accuracy", f"{name}: accuracy of the full composition",
                     vline=cfg.train_length, vline_label="longest training length")
    report.line_plot(out / f"{stem}_loss.png", {lab: (list(range(len(results[k]["losses"]))),
                                                      smoothed(results[k]["losses"]))
                                                for lab, k in zip(labels, kinds)},
                     "step", "training loss (nats, running mean)", f"{name} training loss")
    chance = 1 / GROUPS[name].size
    return [(f"{name}: models", report.markdown_table(["model", "non-embedding params", "train s", "final loss"],
                                                      model_rows)),
            (f"{name}: accuracy of the last position (the whole composition), chance {chance:.3f}",
             report.markdown_table(["length"] + labels, last_rows) + f"\n\n![{name} accuracy]({stem}_accuracy.png)"),
            (f"{name}: accuracy over all positions", report.markdown_table(["length"] + labels, token_rows)),
            (f"{name}: training loss", f"![{name} loss]({stem}_loss.png)")]


def write_results(results: dict, cfg: S5Config, args) -> None:
    steps = ", ".join(f"{name}: {n} steps" for name, n in cfg.groups)
    setup = (f"AdamW per model ({steps}), batch {cfg.batch}, lr {cfg.lr}, "
             f"lengths {cfg.min_length}-{cfg.train_length} (curriculum over the first {cfg.curriculum_fraction:.0%} "
             f"of training), {cfg.eval_rows} test sequences per length, seed {args.seed}.")
    sections = [("Setup", setup)]
    for name, _ in cfg.groups:
        sections += group_sections(name, results[name], cfg, args.out)
    report.write_report(args.out / "s5.md", "S5 state tracking",
                        "python -m examples.experiments.s5" + (" --quick" if args.quick else ""), PAPER, sections)
    common.save_json(args.out / "s5.json", {"config": asdict(cfg), "seed": args.seed, "results": results})


def main(argv=None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv, extra=lambda p: p.add_argument("--models", default=None))
    cfg = QUICK if args.quick else S5Config()
    if args.models:
        cfg = replace(cfg, models=tuple(args.models.split(",")))
    results = {name: {kind: train_one(GROUPS[name], steps, kind, cfg, args.seed) for kind in cfg.models}
               for name, steps in cfg.groups}
    write_results(results, cfg, args)
    print(f"wrote {args.out / 's5.md'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
