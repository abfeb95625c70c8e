"""Branch and bound on ReLU splits for feed-forward ReLU chains, in plain torch.

`relaxed` bounds a batch of sub-domains by backward linear propagation with per-domain lower
slopes (alpha) and split multipliers (beta, as in beta-CROWN); `root` computes and optimises the
pre-activation bounds at the root; `search` branches, warm-starting each child from its parent.
"""
