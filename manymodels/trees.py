"""A LightGBM model as flat arrays, predicted exactly as LightGBM predicts it, without a Booster.

Scoring tiny partitions is bound by building one ``lightgbm.Booster`` per model: LightGBM parses
every line of the model text (split gains, leaf weights and counts, internal values: more than half
of it is never used to predict), then the Python wrapper decodes every parameter as JSON. A
:class:`Forest` reads only what prediction needs (split features, thresholds, decision types,
children, leaf values, categorical bitsets), tokenised and converted by Arrow's C++ kernels (its
text-to-double conversion is correctly rounded, so every number is the double LightGBM wrote), and
predicts all trees for all rows at once with numpy (QuickScorer's bitvectors, see :class:`Forest`),
following LightGBM's decision rule exactly (``Tree::NumericalDecision`` and
``Tree::CategoricalDecision`` in LightGBM's ``tree.h``, and its dense-row reader's zero threshold)
and adding the trees' outputs in tree order, as LightGBM does.

Parsing still costs about half of LightGBM's own parse, so training also writes each model's
compact form (:func:`compact`: the arrays as bytes) beside its text, and scoring loads that
(:func:`load_compact`) at a few percent of a Booster's cost.

:func:`parse_forest` returns ``None`` for a model this module does not reproduce bit for bit
(multiclass, linear trees, objectives whose output transform is not reproduced, a text it does not
recognise): the caller then uses LightGBM's own Booster, which stays the reference. The tests
(``tests/test_trees.py``) check every prediction bitwise against ``Booster.predict``.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["COMPACT_SUFFIX", "Forest", "compact", "load_compact", "parse_forest"]

COMPACT_SUFFIX = ".forest"
"""A model's compact form is stored at its text's key + this suffix (see :func:`compact`)."""
_MAGIC = b"manymodels-forest 1\n"
_ARRAYS = ("column", "threshold", "mask", "segment", "split_tree", "leaf_base", "leaf_value", "cat_feature",
           "cat_start", "cat_words", "cat_bits")

# LightGBM's kZeroThreshold is the float 1e-35f, compared as a double.
K_ZERO = float(np.float32(1e-35))
# A tree block's lines, in the order LightGBM's Tree::ToString writes them (offsets from "Tree=").
_LINE = {"num_leaves": 1, "num_cat": 2, "split_feature": 3, "threshold": 5, "decision_type": 6,
         "left_child": 7, "right_child": 8, "leaf_value": 9}
_IDENTITY = {"regression", "regression_l1", "huber", "fair", "quantile", "mape"}
_EXP = {"poisson", "gamma", "tweedie"}
_BLOCK_ROWS = 512  # rows predicted at once (the split table is rows × splits)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
# Planes of the value matrix, one per way a numerical split treats NaN and zero (see Forest._values).
_PLANE_NONE, _PLANE_ZERO_LEFT, _PLANE_ZERO_RIGHT, _PLANE_NAN_LEFT, _PLANE_NAN_RIGHT = range(5)


@dataclass(frozen=True, eq=False)
class Forest:
    """The arrays of a LightGBM model that prediction needs, laid out for QuickScorer.

    Every split is tested for every row at once; a tree's exit leaf is then found without walking
    it (Lucchese et al., "QuickScorer", SIGIR 2015): number a tree's leaves left to right; a split
    that sends a row right rules out the leaves of its left subtree (its ``mask`` clears their bits);
    the exit leaf is the leftmost leaf no split ruled out. A tree has at most 64 leaves (one word).

    Attributes:
        num_features: columns the model reads (``max_feature_idx + 1``).
        names: the model's feature names (``Booster.feature_name()``).
        params: the parameters scoring reads (``categorical_feature``), as ``Booster.params`` has them.
        pandas_categorical: the category lists stored with the model (``Booster.pandas_categorical``).
        transform: the objective's output transform: ``identity``, ``sqrt``, ``exp`` or ``sigmoid``.
        average: divide the sum by the number of trees (``boosting = "rf"``).
        planes: which planes of the value matrix (see :meth:`_values`) the model uses, in column order.
        column: per split (all trees, tree by tree), the value-matrix column it tests.
        threshold: per split, its threshold: a row goes left when its value is ``<=`` it.
        mask: per split, every leaf bit but those of its left subtree.
        segment: where each tree with splits starts in the split arrays.
        split_tree: the trees with splits (a one-leaf tree always exits at its only leaf).
        leaf_base: per tree, where its leaves start in ``leaf_value``.
        leaf_value: every tree's leaf values, left to right.
        cat_feature, cat_start, cat_words: per categorical split, its feature and its bitset's words.
        cat_bits: all categorical bitsets.
    """

    num_features: int
    names: tuple[str, ...]
    params: dict[str, Any]
    pandas_categorical: list[list[Any]] | None
    transform: str
    average: bool
    planes: tuple[int, ...]
    column: np.ndarray
    threshold: np.ndarray
    mask: np.ndarray
    segment: np.ndarray
    split_tree: np.ndarray
    leaf_base: np.ndarray
    leaf_value: np.ndarray
    cat_feature: np.ndarray
    cat_start: np.ndarray
    cat_words: np.ndarray
    cat_bits: np.ndarray

    def feature_name(self) -> list[str]:
        """The feature names, as ``Booster.feature_name()``."""
        return list(self.names)

    def num_trees(self) -> int:
        """How many trees the model adds."""
        return len(self.leaf_base)

    def _values(self, X: np.ndarray) -> np.ndarray:
        """The value matrix: per row, each used plane's view of the row, then one column per
        categorical split (-inf: the split sends the row left, NaN: right).

        Every split becomes "left when ``value <= threshold``" on its plane: LightGBM first treats
        values within ±kZeroThreshold as 0 (its dense-row reader drops them), then NaN as 0 unless
        missing values have their own direction, then sends NaN (missing type NaN) or 0 (missing
        type Zero) to the default side: -inf is <= every threshold (left), NaN is <= none (right),
        even an infinite one (LightGBM writes ``inf`` for a split of NaN from all numbers).
        """
        x = np.where(np.abs(X) <= K_ZERO, 0.0, X)
        nan = np.isnan(x)
        cols = []
        for plane in self.planes:
            if plane == _PLANE_NONE:
                cols.append(np.where(nan, 0.0, x))
            elif plane in (_PLANE_ZERO_LEFT, _PLANE_ZERO_RIGHT):
                cols.append(np.where(nan | (x == 0.0), -np.inf if plane == _PLANE_ZERO_LEFT else np.nan, x))
            elif plane == _PLANE_NAN_LEFT:
                cols.append(np.where(nan, -np.inf, x))
            else:
                cols.append(x)  # NaN: not <= any threshold, so right
        if len(self.cat_feature):
            v = x[:, self.cat_feature]
            # static_cast<int>: truncation; NaN, negatives and values beyond int go right.
            ok = (v > -1.0) & (v < 2147483648.0)
            iv = np.where(ok, v, 0.0).astype(np.int64)
            word = iv >> 5
            ok &= word < self.cat_words
            bits = self.cat_bits[self.cat_start + np.minimum(word, self.cat_words - 1)]
            left = ok & (((bits >> (iv & 31)) & 1) == 1)
            cols.append(np.where(left, -np.inf, np.nan))
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)

    def predict_raw(self, X: np.ndarray) -> np.ndarray:
        """The sum of the trees' outputs per row (before the objective's transform)."""
        rows = X.shape[0]
        if rows > _BLOCK_ROWS:  # bounded memory: the split table is rows × splits
            return np.concatenate([self.predict_raw(X[i:i + _BLOCK_ROWS])
                                   for i in range(0, rows, _BLOCK_ROWS)])
        trees = len(self.leaf_base)
        if rows == 0 or trees == 0:
            return np.zeros(rows)
        exit_leaf = np.zeros((rows, trees), dtype=np.int64)
        if len(self.segment):
            left = np.take(self._values(X), self.column, axis=1) <= self.threshold
            alive = np.bitwise_and.reduceat(np.where(left, _ALL, self.mask), self.segment, axis=1)
            lowest = alive & (~alive + np.uint64(1))  # the leftmost leaf left: the exit leaf
            exit_leaf[:, self.split_tree] = np.frexp(lowest.astype(np.float64))[1] - 1
        leaves = self.leaf_value[exit_leaf + self.leaf_base]
        # LightGBM starts from 0.0 and adds tree by tree: a cumulative sum adds in exactly that
        # order (a plain sum may pair terms), and 0.0 + first turns a -0.0 into 0.0 as LightGBM does.
        leaves[:, 0] += 0.0
        out: np.ndarray = np.cumsum(leaves, axis=1)[:, -1]
        if self.average:
            out = out / trees
        return out

    def predict(self, X: np.ndarray, num_threads: int = 1) -> np.ndarray:
        """``Booster.predict(X)``, bit for bit (``num_threads`` is accepted and unused)."""
        del num_threads
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.num_features:
            raise ValueError(f"the model has {self.num_features} features, the data {X.shape[-1]}")
        raw = self.predict_raw(X)
        if self.transform == "identity":
            return raw
        if self.transform == "sqrt":  # Common::Sign(x) * x * x
            sign: np.ndarray = (raw > 0).astype(np.float64) - (raw < 0)
            out: np.ndarray = sign * raw * raw
            return out
        # The C library's exp, as LightGBM's std::exp calls it (numpy's own SIMD exp may differ by an
        # ulp); tests/test_trees.py checks these objectives bitwise.
        if self.transform == "exp":
            return np.array([math.exp(v) for v in raw.tolist()], dtype=np.float64)
        return np.array([1.0 / (1.0 + math.exp(-v)) for v in raw.tolist()], dtype=np.float64)


def _transform(objective: str) -> str | None:
    """The output transform of an ``objective=`` line, or ``None`` if not reproduced exactly."""
    name, *args = objective.split(" ")
    if name in _IDENTITY:
        return "sqrt" if args == ["sqrt"] else "identity" if not args else None
    if name in _EXP and not args:
        return "exp"
    if (name == "binary" and args == ["sigmoid:1"]) or (name == "cross_entropy" and not args):
        return "sigmoid"
    return None


class _Lines:
    """The lines of LightGBM's tree section as byte ranges, read with numpy (no Python line objects)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.bytes = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(self.bytes == 10)
        self.end = ends
        self.start = np.concatenate([[0], ends[:-1] + 1])

    def starting(self, prefix: bytes) -> np.ndarray:
        """Indices of the lines that start with ``prefix`` (whose first byte no other line starts with)."""
        candidates = np.flatnonzero(self.bytes[self.start] == prefix[0]).tolist()
        found: np.ndarray = np.array([i for i in candidates if self.data.startswith(prefix, self.start[i])],
                                     dtype=np.int64)
        return found

    def content(self, lines: np.ndarray, prefix: bytes) -> bytes | None:
        """What follows ``prefix`` on each of ``lines``, joined by spaces (``None`` if a line does not
        start with ``prefix``)."""
        data, n = self.data, len(prefix)
        starts, ends = self.start[lines].tolist(), self.end[lines].tolist()
        if not all(data.startswith(prefix, s) for s in starts):
            return None
        return b" ".join([data[s + n:e] for s, e in zip(starts, ends, strict=True)])

    def ints(self, lines: np.ndarray, prefix: bytes) -> np.ndarray | None:
        raw = self.content(lines, prefix)
        if raw is None:
            return None
        # Whole numbers in decimal: numpy's C parser reads them exactly.
        return np.fromstring(raw, dtype=np.int64, sep=" ")

    def doubles(self, lines: np.ndarray, prefix: bytes) -> np.ndarray | None:
        raw = self.content(lines, prefix)
        if raw is None:
            return None
        if not raw:
            return np.zeros(0)
        # Arrow's text-to-double cast is correctly rounded (and far faster than Python's float()).
        # The tokens as one Arrow string array: the text without its spaces, cut where they were.
        spaces = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == 32)
        packed = raw.replace(b" ", b"")
        offsets = np.empty(len(spaces) + 2, dtype=np.int32)
        offsets[0], offsets[-1] = 0, len(packed)
        offsets[1:-1] = spaces - np.arange(len(spaces))
        tokens = pa.StringArray.from_buffers(len(spaces) + 1, pa.py_buffer(offsets.tobytes()),
                                             pa.py_buffer(packed))
        return np.asarray(pc.cast(tokens, pa.float64()).to_numpy(zero_copy_only=False))


def _header(text: str) -> dict[str, str]:
    out = {}
    for line in text.split("\n"):
        key, eq, value = line.partition("=")
        out[key] = value if eq else ""
    return out


def parse_forest(model: str | bytes) -> Forest | None:
    """The model text as a :class:`Forest`, or ``None`` where LightGBM's Booster must predict it.

    ``None`` for: multiclass models, linear trees, trees of more than 64 leaves, objectives other
    than the regression family, poisson/gamma/tweedie, ``binary`` (sigmoid 1) and ``cross_entropy``,
    NaN thresholds, and any text not in the layout LightGBM 4 writes. Never raises for a bad text:
    ``None`` (the Booster then reports what is wrong with it).
    """
    try:
        return _parse(model.encode() if isinstance(model, str) else model)
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, pa.ArrowException):
        return None


def _parse(data: bytes) -> Forest | None:
    begin = data.find(b"\nTree=0\n")
    end = data.find(b"\nend of trees", begin)
    if begin < 0 or end < 0:
        return None
    head = _header(data[:begin].decode())
    if head.get("version") != "v4" or head.get("num_tree_per_iteration") != "1" or \
            head.get("num_class") != "1":
        return None
    transform = _transform(head.get("objective", ""))
    if transform is None:
        return None
    num_features = int(head["max_feature_idx"]) + 1
    names = tuple(head["feature_names"].split(" "))
    if len(names) != num_features:
        return None
    lines = _Lines(data[begin + 1:end + 1])
    starts = lines.starting(b"Tree=")
    trees = len(starts)
    if trees == 0:
        return None
    leaves = lines.ints(starts + _LINE["num_leaves"], b"num_leaves=")
    cats = lines.ints(starts + _LINE["num_cat"], b"num_cat=")
    if leaves is None or cats is None or len(leaves) != trees or len(cats) != trees or \
            (leaves < 1).any() or (cats < 0).any():
        return None
    linear = lines.ints(starts + np.where(cats > 0, 17, 15), b"is_linear=")  # after internal_count
    if linear is None or len(linear) != trees or linear.any():
        return None
    split = starts[leaves > 1]  # a one-leaf tree writes empty split lines
    feature = lines.ints(split + _LINE["split_feature"], b"split_feature=")
    threshold = lines.doubles(split + _LINE["threshold"], b"threshold=")
    decision = lines.ints(split + _LINE["decision_type"], b"decision_type=")
    left = lines.ints(split + _LINE["left_child"], b"left_child=")
    right = lines.ints(split + _LINE["right_child"], b"right_child=")
    leaf_value = lines.doubles(starts + _LINE["leaf_value"], b"leaf_value=")
    inner = leaves - 1
    n_inner, n_leaves = int(inner.sum()), int(leaves.sum())
    if feature is None or threshold is None or decision is None or left is None or right is None \
            or leaf_value is None or not len(feature) == len(threshold) == len(decision) == len(left) \
            == len(right) == n_inner or len(leaf_value) != n_leaves:
        return None
    if n_inner and (feature.min() < 0 or feature.max() >= num_features):
        return None
    if leaves.max() > 64:
        return None
    inner_base = np.cumsum(inner) - inner  # each tree's first split
    leaf_base = np.cumsum(leaves) - leaves  # each tree's first leaf
    tree_of = np.repeat(np.arange(trees), inner)
    # Children in the split numbering (>= 0) or as ~(leaf in the leaf numbering), as LightGBM's.
    left = np.where(left >= 0, inner_base[tree_of] + left, ~(leaf_base[tree_of] + ~left))
    right = np.where(right >= 0, inner_base[tree_of] + right, ~(leaf_base[tree_of] + ~right))
    if n_inner and (max(left.max(), right.max()) >= n_inner or min(left.min(), right.min()) < -n_leaves):
        return None
    is_cat = (decision & 1) == 1
    numerical = ~is_cat
    if np.isnan(threshold[numerical]).any():
        return None
    missing = (decision >> 2) & 3
    default_left = (decision & 2) == 2
    plane = np.where(missing == 1, np.where(default_left, _PLANE_ZERO_LEFT, _PLANE_ZERO_RIGHT),
                     np.where(missing == 2, np.where(default_left, _PLANE_NAN_LEFT, _PLANE_NAN_RIGHT),
                              _PLANE_NONE))
    used = tuple(int(p) for p in np.unique(plane[numerical]))
    rank = np.zeros(5, dtype=np.int64)
    rank[list(used)] = np.arange(len(used))
    column = rank[plane] * num_features + feature
    node_threshold = np.where(is_cat, 0.0, threshold)
    cat_feature = cat_start = cat_words = cat_bits = np.zeros(0, dtype=np.int64)
    if is_cat.any():
        with_cats = starts[cats > 0]
        bounds = lines.ints(with_cats + 15, b"cat_boundaries=")
        bits = lines.ints(with_cats + 16, b"cat_threshold=")
        tree_cats = cats[cats > 0]
        if bounds is None or bits is None or len(bounds) != int((tree_cats + 1).sum()):
            return None
        # Per tree: its boundaries (num_cat + 1 of them), shifted by the words of earlier trees.
        first = np.cumsum(tree_cats + 1) - (tree_cats + 1)
        words_of_tree = bounds[first + tree_cats]
        if int(words_of_tree.sum()) != len(bits):
            return None
        shifted = bounds + np.repeat(np.cumsum(words_of_tree) - words_of_tree, tree_cats + 1)
        last = np.arange(len(bounds)) - np.repeat(first, tree_cats + 1) == np.repeat(tree_cats, tree_cats + 1)
        lo, hi = shifted[~last], shifted[np.flatnonzero(~last) + 1]
        cat_base = np.zeros(trees, dtype=np.int64)
        cat_base[cats > 0] = np.cumsum(tree_cats) - tree_cats
        cat_nodes = np.flatnonzero(is_cat)
        local = threshold[cat_nodes].astype(np.int64)
        if (threshold[cat_nodes] != local).any() or (local < 0).any() or \
                (local >= cats[tree_of[cat_nodes]]).any():
            return None
        index = cat_base[tree_of[cat_nodes]] + local
        cat_feature = feature[cat_nodes]
        cat_start, cat_words = lo[index], hi[index] - lo[index]
        if (cat_words < 1).any():
            return None
        cat_bits = bits
        column[cat_nodes] = len(used) * num_features + np.arange(len(cat_nodes))
    # Left-to-right leaf positions, level by level from the roots: a node's leaves are the
    # positions [first, first + count); its left child starts where it starts, its right child
    # after the left child's leaves. Splits and leaves in one numbering here: leaf l is n_inner + l.
    kid_left = np.where(left >= 0, left, n_inner + ~left)
    kid_right = np.where(right >= 0, right, n_inner + ~right)
    count = np.ones(n_inner + n_leaves, dtype=np.int64)  # leaves under each node
    levels = []
    frontier = inner_base[leaves > 1]
    while len(frontier):
        levels.append(frontier)
        kids = np.concatenate([kid_left[frontier], kid_right[frontier]])
        frontier = kids[kids < n_inner]
        if len(levels) > 64:
            return None
    for level in reversed(levels):
        count[level] = count[kid_left[level]] + count[kid_right[level]]
    first = np.zeros(n_inner + n_leaves, dtype=np.int64)
    for level in levels:
        first[kid_left[level]] = first[level]
        first[kid_right[level]] = first[level] + count[kid_left[level]]
    lcount = count[kid_left].astype(np.uint64)
    mask = ~(((np.uint64(1) << lcount) - np.uint64(1)) << first[:n_inner].astype(np.uint64))
    ordered = np.empty(n_leaves)
    ordered[np.repeat(leaf_base, leaves) + first[n_inner:]] = leaf_value  # a one-leaf tree's: first 0
    return Forest(num_features=num_features, names=names, params=_params(data, end),
                  pandas_categorical=_pandas_categorical(data), transform=transform,
                  average="average_output" in head, planes=used, column=column,
                  threshold=node_threshold, mask=mask, segment=inner_base[leaves > 1],
                  split_tree=np.flatnonzero(leaves > 1), leaf_base=leaf_base, leaf_value=ordered,
                  cat_feature=cat_feature, cat_start=cat_start, cat_words=cat_words, cat_bits=cat_bits)


def _params(data: bytes, end: int) -> dict[str, Any]:
    """``categorical_feature`` from the parameters LightGBM saved with the model."""
    key = b"\n[categorical_feature: "
    at = data.find(key, end)
    if at < 0:
        return {}
    value = data[at + len(key):data.index(b"]", at)].decode().strip()
    return {"categorical_feature": [int(v) for v in value.split(",")] if value else []}


def _pandas_categorical(data: bytes) -> list[list[Any]] | None:
    """The category lists, read as ``lightgbm.basic._load_pandas_categorical`` reads them (the last
    line of the text)."""
    key = "pandas_categorical:"
    text = data[data.rfind(b"\n", 0, max(0, len(data) - len(key))):].decode()
    last = text.strip()
    if last.startswith(key):
        cats: list[list[Any]] | None = json.loads(last[len(key):])
        return cats
    return None


def compact(text: str | bytes) -> bytes | None:
    """The model's :class:`Forest` as bytes (``None`` where the Booster must predict it).

    Written beside the model text when a model is trained, so that scoring loads a model with no
    text parsing at all (:func:`load_compact`). The text stays the model: the compact form is derived
    from it (and records its length and CRC-32, so that it can be checked against it).
    """
    data = text.encode() if isinstance(text, str) else text
    forest = parse_forest(data)
    if forest is None:
        return None
    arrays = [np.ascontiguousarray(getattr(forest, name)) for name in _ARRAYS]
    head = {"size": len(data), "crc32": zlib.crc32(data), "num_features": forest.num_features,
            "names": list(forest.names), "params": forest.params,
            "pandas_categorical": forest.pandas_categorical, "transform": forest.transform,
            "average": forest.average, "planes": list(forest.planes),
            "arrays": [[a.dtype.str, len(a)] for a in arrays]}
    header = json.dumps(head, separators=(",", ":")).encode()
    header += b" " * (-(len(_MAGIC) + len(header) + 1) % 8) + b"\n"
    return b"".join([_MAGIC, header, *(a.tobytes() for a in arrays)])


def load_compact(blob: bytes, text: bytes | None = None) -> Forest | None:
    """The :class:`Forest` stored by :func:`compact`; ``None`` if ``blob`` is not a whole compact
    form (a torn write, another format), or, given the model ``text``, not the compact form of that
    text."""
    try:
        if not blob.startswith(_MAGIC):
            return None
        end = blob.index(b"\n", len(_MAGIC))
        head = json.loads(blob[len(_MAGIC):end])
        if text is not None and (head["size"] != len(text) or head["crc32"] != zlib.crc32(text)):
            return None
        arrays = {}
        at = end + 1
        for name, (dtype, n) in zip(_ARRAYS, head["arrays"], strict=True):
            arrays[name] = np.frombuffer(blob, dtype=np.dtype(dtype), count=n, offset=at)
            at += arrays[name].nbytes
        if at != len(blob):
            return None
        return Forest(num_features=int(head["num_features"]), names=tuple(head["names"]),
                      params=head["params"], pandas_categorical=head["pandas_categorical"],
                      transform=head["transform"], average=bool(head["average"]),
                      planes=tuple(head["planes"]), **arrays)
    except (ValueError, KeyError, TypeError):
        return None
