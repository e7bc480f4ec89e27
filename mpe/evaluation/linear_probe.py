"""Linear probes on frozen image embeddings: how much of each aspect of a scene (shape, colour, size,
position, background, relation) an image embedding holds, read by a multinomial logistic regression fitted on
the training images' embeddings and scored on the test images', against chance (the test split's most
frequent class, what a probe that ignores the image gets at best)."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

# aspect -> the image metadata column holding it (mpe.data.prepare.EXTRA_COLUMNS); relation only where there
# are two objects
PROBED = {
    "shape": "main_shape",
    "colour": "main_colour",
    "size": "main_size",
    "position": "main_position",
    "background": "background",
    "relation": "relation",
}


def fit_probe(
    x: torch.Tensor, y: list[str], x_test: torch.Tensor, y_test: list[str], weight_decay: float = 1e-3
) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features (L-BFGS, L2 penalty);
    a test class the training labels lack counts as wrong."""
    classes = sorted(set(y))
    index = {c: i for i, c in enumerate(classes)}
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    target = torch.tensor([index[c] for c in y])
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, target) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (x_test @ w + b).argmax(1).tolist()
    return sum(classes[p] == t for p, t in zip(pred, y_test)) / len(y_test)


def chance(y_test: list[str]) -> float:
    """The share of the test split's most frequent class."""
    return Counter(y_test).most_common(1)[0][1] / len(y_test)


def probe_aspects(
    train_emb: torch.Tensor, train_meta: list[dict], test_emb: torch.Tensor, test_meta: list[dict]
) -> dict:
    """``{"probe_<aspect>": accuracy, "probe_<aspect>_chance": chance}`` for every aspect both splits label
    with at least two classes (relation: the two-object images only)."""
    out = {}
    for aspect, column in PROBED.items():
        rows = [i for i, m in enumerate(train_meta) if m.get(column) not in (None, "none")]
        test_rows = [i for i, m in enumerate(test_meta) if m.get(column) not in (None, "none")]
        y = [str(train_meta[i][column]) for i in rows]
        y_test = [str(test_meta[i][column]) for i in test_rows]
        if len(set(y)) < 2 or not y_test:
            continue
        out[f"probe_{aspect}"] = fit_probe(train_emb[rows].float(), y, test_emb[test_rows].float(), y_test)
        out[f"probe_{aspect}_chance"] = chance(y_test)
    return out
