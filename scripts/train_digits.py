"""Train the shipped digits models (run once; the weights ship inside the package).

A spectral-norm penalty keeps the Lipschitz constants small so the shipped models have
non-trivial certified accuracy. Deterministic under the fixed seed.
"""

import torch
from torch import nn

from lipverify.data import digits_split
from lipverify.models import ARCHITECTURES, shipped_path

EPOCHS = 300
LIP_PENALTY = 0.02


def spectral_penalty(model: nn.Module) -> torch.Tensor:
    total = torch.zeros(())
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total = total + torch.linalg.matrix_norm(m.weight, ord=2)
        elif isinstance(m, nn.Conv2d):
            total = total + torch.linalg.matrix_norm(m.weight.flatten(1), ord=2) * m.kernel_size[0]
    return total


def train(name: str) -> None:
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = digits_split()
    x_tr, y_tr = torch.tensor(x_tr), torch.tensor(y_tr)
    model = ARCHITECTURES[name]()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(x_tr))
        for i in range(0, len(x_tr), 128):
            idx = perm[i:i + 128]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss = loss + LIP_PENALTY * spectral_penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.tensor(x_te)).argmax(1).numpy() == y_te).mean()
    torch.save(model.state_dict(), shipped_path(name))
    print(f"{name}: test accuracy {acc:.3f}")


if __name__ == "__main__":
    for arch in ARCHITECTURES:
        train(arch)
