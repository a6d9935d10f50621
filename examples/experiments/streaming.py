"""Experiment 4: streaming generation cost (PAPER.md §5).

Generates tokens one at a time (batch 1, sampling with a seeded generator) from randomly
initialised models: Transformer-PSM through its psmc `step` (binary-counter state), and the
softmax transformer with a KV cache. Records the time of every step and the bytes of the state
each model carries. The plotted time is the CPU time of the generating thread (torch runs on one
thread here), because wall time on a shared machine mostly measures the other jobs. Before timing, it checks that stepping reproduces the parallel logits.

    python -m examples.experiments.streaming [--quick] [--seed 0] [--tokens 20000]
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from . import common, report
from .models import MODEL_LABELS, build_model

PAPER = ("over 40,000 generated tokens, GPT-2's per-token time grows from about 2 ms to 40 ms; "
         "Transformer-PSM stays flat below about 8 ms.")

VOCAB = 256  # the byte vocabulary of the language-modelling experiment


@dataclass(frozen=True)
class StreamConfig:
    tokens: int = 20_000
    chunks: tuple[int, ...] = (1, 32)
    check_tokens: int = 200  # positions compared between step-by-step and parallel logits
    bin_size: int = 250  # latencies are summarised as the median of each bin of positions


QUICK = StreamConfig(tokens=600, check_tokens=64, bin_size=50)


def build(name: str) -> torch.nn.Module:
    kind, _, chunk = name.partition("_c")
    return build_model(kind, vocab=VOCAB, **({"C": int(chunk)} if chunk else {})).eval()


def label(name: str) -> str:
    kind, _, chunk = name.partition("_c")
    return MODEL_LABELS[kind] + (f" (C={chunk}, step)" if chunk else " (KV cache)")


@torch.inference_mode()
def stream(model, tokens: int, gen: torch.Generator, desc: str = "stream") -> dict:
    """Sample `tokens` tokens; per-step wall and thread-CPU seconds, state bytes after each step,
    the input tokens and the logits."""
    state, token = model.init_state(batch=1), torch.zeros(1, dtype=torch.long)
    seconds, cpu_seconds, nbytes, generated, logits_seen = [], [], [], [], []
    for _ in tqdm(range(tokens), desc=desc, dynamic_ncols=True, mininterval=2.0):
        start, cpu_start = time.perf_counter(), time.thread_time()
        logits, state = model.step(state, token)
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.thread_time() - cpu_start)
        nbytes.append(state.nbytes)
        generated.append(token)
        logits_seen.append(logits)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "nbytes": nbytes, "inputs": torch.cat([torch.zeros(1, dtype=torch.long)] +
                                                                       generated[:-1]),
            "logits": torch.cat(logits_seen)}


@torch.inference_mode()
def step_vs_parallel(model, inputs: torch.Tensor, step_logits: torch.Tensor) -> float:
    """Max |step logits - parallel logits| over the same input tokens."""
    return (model(inputs[None])[0] - step_logits).abs().max().item()


def check_stream(model, tokens: int, gen: torch.Generator) -> float:
    run = stream(model, tokens, gen, desc="check")
    return step_vs_parallel(model, run["inputs"], run["logits"])


def binned(values: list[float], size: int) -> tuple[list[int], list[float]]:
    starts = range(0, len(values) - size + 1, size)
    return [s + size // 2 for s in starts], [statistics.median(values[s:s + size]) for s in starts]


def run_one(name: str, cfg: StreamConfig, seed: int) -> dict:
    gen = common.seed_everything(seed)
    model = build(name)
    mismatch = check_stream(model, cfg.check_tokens, gen)
    run = stream(model, cfg.tokens, gen, desc=f"generate {name}")
    xs, cpu_ms = binned([s * 1e3 for s in run["cpu_seconds"]], cfg.bin_size)
    _, wall_ms = binned([s * 1e3 for s in run["seconds"]], cfg.bin_size)
    return {"max_abs_step_vs_parallel": mismatch, "bin_centres": xs, "median_cpu_ms": cpu_ms,
            "median_wall_ms": wall_ms, "nbytes": run["nbytes"], "total_seconds": sum(run["seconds"]),
            "total_cpu_seconds": sum(run["cpu_seconds"])}


def write_results(results: dict, cfg: StreamConfig, args) -> None:
    out, names = args.out, list(results)
    labels = [label(n) for n in names]
    marks = [p for p in (1_000, 2_000, 5_000, 10_000, 20_000, 40_000) if p <= cfg.tokens] or [cfg.tokens]

    def at(name, position):  # the last bin before `position`, and the state after that many tokens
        r = results[name]
        index = max([i for i, centre in enumerate(r["bin_centres"]) if centre <= position] or [0])
        return r["median_cpu_ms"][index], r["median_wall_ms"][index], r["nbytes"][position - 1] / 1024

    cell = lambda n, p: "{:.2f} ms ({:.2f}) / {:,.1f} KiB".format(*at(n, p))
    rows = [[p] + [cell(n, p) for n in names] for p in marks]
    checks = [[label(n), f"{results[n]['max_abs_step_vs_parallel']:.2e}", f"{results[n]['total_cpu_seconds']:.1f}",
               f"{results[n]['total_seconds']:.1f}"] for n in names]
    report.line_plot(out / "streaming_latency.png",
                     {lab: (results[n]["bin_centres"], results[n]["median_cpu_ms"]) for lab, n in zip(labels, names)},
                     "position (tokens generated)", f"CPU ms per token (median of {cfg.bin_size})",
                     "Streaming: per-token cost vs position")
    report.line_plot(out / "streaming_memory.png",
                     {lab: (list(range(1, cfg.tokens + 1)), [b / 1024 for b in results[n]["nbytes"]])
                      for lab, n in zip(labels, names)},
                     "position (tokens generated)", "state held (KiB, log scale)",
                     "Streaming: state memory vs position", logy=True)
    setup = (f"{cfg.tokens:,} tokens sampled one at a time at batch 1 from randomly initialised models "
             f"(the shared budget: Transformer-PSM 2 layers of width 64; transformer 2 layers of width 96), "
             f"torch on CPU with {args.threads} thread(s), seed {args.seed}. Latency = CPU time of the generating "
             f"thread for one `step` plus sampling (wall time is reported too but includes the other jobs "
             f"of the shared machine); memory = bytes of the stream state (psmc `state.nbytes`; the KV cache's used "
             f"length for the transformer).")
    report.write_report(
        out / "streaming.md", "Streaming generation", "python -m examples.experiments.streaming"
        + (" --quick" if args.quick else ""), PAPER,
        [("Setup", setup),
         ("Step-by-step equals parallel", f"Max |step logits - parallel logits| over the first "
          f"{cfg.check_tokens} generated tokens, and the total generation time:\n\n"
          + report.markdown_table(["model", "max abs diff", f"CPU s for {cfg.tokens:,} tokens", "wall s"], checks)),
         ("Latency and state per position", "Each cell: median CPU ms per token over the bin of "
          f"{cfg.bin_size} positions ending there (median wall ms in brackets) / state KiB after that many "
          "tokens.\n\n" + report.markdown_table(["position"] + labels, rows)
          + "\n\n![latency](streaming_latency.png)\n\n![memory](streaming_memory.png)")])
    common.save_json(out / "streaming.json", {"config": asdict(cfg), "seed": args.seed, "results": {
        n: {k: v for k, v in r.items() if k != "nbytes"} | {"nbytes_at": {p: r["nbytes"][p - 1] for p in marks}}
        for n, r in results.items()}})


def main(argv=None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv,
                             extra=lambda p: p.add_argument("--tokens", type=int, default=None))
    cfg = QUICK if args.quick else StreamConfig()
    if args.tokens:
        cfg = StreamConfig(**{**asdict(cfg), "tokens": args.tokens})
    names = [f"tpsm_c{c}" for c in cfg.chunks] + ["transformer"]
    results = {name: run_one(name, cfg, args.seed) for name in names}
    write_results(results, cfg, args)
    print(f"wrote {args.out / 'streaming.md'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
