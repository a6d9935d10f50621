"""Command-line plumbing shared by the experiment scripts: seeds, threads, output folders."""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "docs" / "results"


def parse_args(description: str, argv=None, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke-test size (< 3 min on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: these widths gain little from more)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: docs/results, or a temp folder with --quick)")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    if args.out is None:
        # Quick runs are smoke tests: keep them from overwriting the committed full results.
        args.out = Path(tempfile.gettempdir()) / "psmc-experiments-quick" if args.quick else RESULTS_DIR
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    return args


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def save_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
