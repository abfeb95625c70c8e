"""Input data: scikit-learn's bundled digits (offline) or a `.npz` with arrays `x` and `y`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lipverify.errors import InputError

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.25


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1] as 1x8x8 images: (x_train, y_train, x_test, y_test), fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SEED).permutation(len(x))
    n_test = int(round(len(x) * DIGITS_TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_data(spec: str | Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`digits` (the held-out test split) or a `.npz` file holding `x` and `y`."""
    if str(spec) == "digits":
        _, _, x, y = digits_split()
    else:
        path = Path(spec)
        if not path.exists():
            raise InputError(f"data file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as archive:
                missing = [k for k in ("x", "y") if k not in archive.files]
                if missing:
                    raise InputError(f"{path}: missing array(s) {', '.join(missing)} "
                                     f"(has {', '.join(archive.files) or 'none'})")
                x, y = archive["x"], archive["y"]
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: not a readable .npz file ({exc})") from exc
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"x must be floating point, got {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"y must hold integer labels, got {y.dtype}")
    if len(x) != len(y):
        raise InputError(f"x has {len(x)} samples but y has {len(y)}")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)
