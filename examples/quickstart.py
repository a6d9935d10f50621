"""The psmc tour in one script: compile two operators, train-mode pass vs streaming.

    python examples/quickstart.py

GLA (an associative, exact scan) and Transformer-PSM (a non-associative aggregator on the
paper's fixed Blelloch tree): for each, run the parallel pass over a random sequence, then
stream the same tokens one at a time with `step`, and print the largest difference and the
size of the streaming state.
"""
from pathlib import Path

import torch

import psmc

HERE = Path(__file__).resolve().parent


def stream(layer, state, inputs, T):
    outputs = []
    for t in range(T):
        out, state = layer.step(state, **{name: x[:, t] for name, x in inputs.items()})
        outputs.append(out)
    return torch.stack(outputs, dim=1), state


def main():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 100, 4, 16, 16

    GLA = psmc.load(HERE / "gla.psm").gla
    gla = GLA(K=K, V=V)
    inputs = dict(k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V),
                  gk=torch.nn.functional.logsigmoid(torch.randn(B, T, H, K)), q=torch.randn(B, T, H, K))
    parallel = gla(**inputs)
    streamed, state = stream(gla, gla.init_state(), inputs, T)
    print(f"gla              parallel vs streaming: max |diff| = {(parallel - streamed).abs().max():.2e} "
          f"(outputs up to {parallel.abs().max():.1f})   state = {state.nbytes:,} bytes")

    TPSM = psmc.load(HERE / "transformer_psm.psm").transformer_psm
    C, D = 8, 32
    tpsm = TPSM(C=C, D=D, H=4)
    x = torch.randn(B, T, D)
    with torch.no_grad():
        parallel = tpsm(x=x)
        streamed, state = stream(tpsm, tpsm.init_state(), {"x": x}, T)
    print(f"transformer_psm  parallel vs streaming: max |diff| = {(parallel - streamed).abs().max():.2e} "
          f"(outputs up to {parallel.abs().max():.1f})   state = {state.nbytes:,} bytes ({T // C} chunks of {C} tokens in a binary counter)")


if __name__ == "__main__":
    main()
