"""Small-scale reproductions of the Transformer-PSM paper's experiments (PAPER.md §5).

Every psmc layer here comes from `psmc.load` of a `.psm` file in examples/; the baselines that
psmc does not generate (the softmax transformer, projections, MLPs) are plain torch.
Run one experiment with `python -m examples.experiments.<s5|mqar|lm|streaming> [--quick]`.
"""
