"""Document quality scores on a 0-5 scale, for CLIMB cluster pruning (algorithms.md).

Two scorers behind one operator, `QualityScorer` (adds `quality`, float32):

* **heuristics** (default; no model): five transparent signals, each mapped to [0, 1] by
  a linear ramp between a "bad" and a "good" value, averaged with equal weight, times 5.
  Thresholds follow the Gopher rules (Rae et al. 2021) where they exist.

  | signal           | measured as                                              | 0 at  | 1 at  |
  |------------------|----------------------------------------------------------|-------|-------|
  | `length`         | log of the number of words                               | 5     | 50    |
  | `alpha`          | alphabetic characters / non-space characters             | 0.40  | 0.75  |
  | `repetition`     | worse of: lines repeating an earlier line / lines        | 0.50  | 0.10  |
  |                  | and chars in the most frequent word bigram / word chars  | 0.40  | 0.20  |
  | `word_length`    | mean characters per word; 1 inside [3, 10]               | 1.5,20| 3, 10 |
  | `stop_words`     | share of words in a small English stop-word list         | 0.05  | 0.25  |

  Words are whitespace-separated; for text that is mostly CJK (> 30% of non-space
  characters) each non-space character counts as a word and `word_length`/`stop_words`
  score 1 (they are meaningless there). The rules are English-prose-centric and coarse:
  on the first 300 rows of each file in shared/data the file means range from 4.3
  (Python code: few stop words, more repetition) to 5.0 (books), while junk such as
  repeated characters, symbol soup or "buy now buy now ..." scores 1.1-2.5. They catch
  boilerplate and garbage, not subtle quality; use a trained classifier for that.
  `heuristic_features` exposes each signal for inspection.

* **classifier** loaded from a local file (`ClassifierScorer`): any
  scikit-learn estimator or Pipeline that takes a list of raw strings, e.g.
  `make_pipeline(TfidfVectorizer(), LogisticRegression())`. With `predict_proba`, its
  `classes_` must be numeric quality levels in [0, 5] (e.g. 0..5 as in FineWeb-Edu, or
  0/5 for a bad/good classifier); score = expected level = sum_c P(c) * c. Without
  `predict_proba`, `predict` must return numbers (a regressor); they are clipped to
  [0, 5]. Format: a `.skops` file (`skops.io.dump`), loaded with only the types skops trusts
  by default (scikit-learn, numpy, scipy): a file naming any other type is refused, so loading
  it cannot run code. A joblib/pickle file (any other extension) runs code when loaded and is
  refused unless `trust_pickle=True` (config: `cluster.prune.trust_pickle: true`).
"""
from __future__ import annotations

import collections
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from operators.base import Operator
from operators.embed import document_texts
from operators.schema import PROMPT, QUALITY, RESPONSE, TEXT

HEURISTIC_SIGNALS = ("length", "alpha", "repetition", "word_length", "stop_words")

_STOP_WORDS = frozenset("""
a about after all also an and any are as at be because been but by can could did do does
for from had has have he her his how i if in into is it its just more most my no not of on
one only or other our out she so some such than that the their them then there these they
this to up was we were what when which who will with would you your
""".split())
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_EDGE_PUNCT = "\"'()[]{}<>.,;:!?-*_`"


def _ramp(x: float, bad: float, good: float) -> float:
    """0 at `bad`, 1 at `good`, linear between, clipped; works for bad > good too."""
    return min(1.0, max(0.0, (x - bad) / (good - bad)))


def _signals(text: str) -> tuple[float, float, float, float, float]:
    """The five sub-scores of one document, each in [0, 1] (order: HEURISTIC_SIGNALS)."""
    chars = "".join(text.split())
    if not chars:
        return (0.0, 0.0, 0.0, 0.0, 0.0)
    cjk = len(_CJK.findall(chars)) / len(chars) > 0.3
    words = list(chars) if cjk else text.split()

    length = _ramp(math.log(len(words)), math.log(5), math.log(50))
    alpha = _ramp(sum(c.isalpha() for c in chars) / len(chars), 0.40, 0.75)

    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    dup_lines = 1 - len(set(lines)) / len(lines)  # lines that repeat an earlier line
    top_bigram = 0.0
    if len(words) >= 4:
        bigram, count = collections.Counter(zip(words, words[1:])).most_common(1)[0]
        # Gopher: characters covered by the most frequent bigram's occurrences (can overlap, so cap).
        top_bigram = min(1.0, count * (len(bigram[0]) + len(bigram[1])) / sum(map(len, words)))
    repetition = min(_ramp(dup_lines, 0.50, 0.10), _ramp(top_bigram, 0.40, 0.20))

    if cjk:
        return (length, alpha, repetition, 1.0, 1.0)
    mean_len = len(chars) / len(words)
    word_length = _ramp(mean_len, 1.5, 3.0) if mean_len < 3 else _ramp(mean_len, 20.0, 10.0)
    stops = sum(w.strip(_EDGE_PUNCT).lower() in _STOP_WORDS for w in words) / len(words)
    return (length, alpha, repetition, word_length, _ramp(stops, 0.05, 0.25))


def _signal_matrix(texts: Sequence[str]) -> np.ndarray:
    return np.array([_signals(t) for t in texts], np.float32).reshape(-1, len(HEURISTIC_SIGNALS))


def heuristic_features(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Each heuristic sub-score, float32 [N] in [0, 1], keyed by HEURISTIC_SIGNALS."""
    values = _signal_matrix(texts)
    return {name: values[:, i] for i, name in enumerate(HEURISTIC_SIGNALS)}


def heuristic_scores(texts: Sequence[str]) -> np.ndarray:
    """Quality float32 [N] on 0-5: 5 x the mean of the five heuristic sub-scores."""
    return 5.0 * _signal_matrix(texts).mean(axis=1)


def is_pickle_file(path: str | Path) -> bool:
    """Whether a classifier file would be loaded with pickle (anything but `.skops`)."""
    return not str(path).endswith(".skops")


def load_classifier(path: Path, trust_pickle: bool = False):
    """The estimator in a `.skops` file (default-trusted types only), or in a joblib/pickle file
    when `trust_pickle`; raises ValueError naming the file otherwise."""
    if not is_pickle_file(path):
        import skops.io as sio
        untrusted = sio.get_untrusted_types(file=path)
        if untrusted:
            raise ValueError(f"{path}: refusing to load types skops does not trust by default: {untrusted}")
        return sio.load(path)
    if not trust_pickle:
        raise ValueError(f"{path}: a joblib/pickle file runs code when loaded; save it with skops "
                         "(.skops), or pass trust_pickle=True (cluster.prune.trust_pickle: true) if you trust it")
    import joblib
    return joblib.load(path)


class ClassifierScorer:
    """A scikit-learn model from a joblib file; call it on strings -> float32 [N] on 0-5.

    Interface of the loaded object (checked at load): `predict_proba(list[str])` with
    numeric `classes_` in [0, 5] (score = expected class), or else `predict(list[str])`
    returning numbers (clipped to [0, 5]).
    """

    def __init__(self, path: str | Path, trust_pickle: bool = False):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"quality classifier not found: {path}")
        self.path = path
        self.model = load_classifier(path, trust_pickle)
        self.levels: np.ndarray | None = None
        if hasattr(self.model, "predict_proba"):
            try:
                self.levels = np.asarray(self.model.classes_, np.float64)
            except (AttributeError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: predict_proba needs numeric classes_ (quality levels "
                                 f"0-5), got {getattr(self.model, 'classes_', None)!r}") from err
            if self.levels.min() < 0 or self.levels.max() > 5:
                raise ValueError(f"{path}: classes_ must lie in [0, 5], got {self.levels.tolist()}")
        elif not hasattr(self.model, "predict"):
            raise TypeError(f"{path}: {type(self.model).__name__} has neither predict_proba nor predict")

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros(0, np.float32)
        if self.levels is not None:
            return (self.model.predict_proba(list(texts)) @ self.levels).astype(np.float32)
        return np.clip(np.asarray(self.model.predict(list(texts)), np.float64), 0, 5).astype(np.float32)


class QualityScorer(Operator):
    """Adds `quality` (float32, 0-5): heuristics, or a classifier file when given.

    Reads `text`, or `prompt`/`response` where text is null (embed.document_texts).
    """
    reads = (TEXT, PROMPT, RESPONSE)
    adds = (QUALITY,)

    def __init__(self, *, classifier: str | None = None, trust_pickle: bool = False):
        self.classifier, self.trust_pickle = classifier, trust_pickle
        self._score: Callable[[Sequence[str]], np.ndarray] | None = None

    def setup(self) -> None:
        if self._score is None:
            self._score = (ClassifierScorer(self.classifier, self.trust_pickle) if self.classifier
                           else heuristic_scores)

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N] quality on 0-5."""
        self.setup()  # idempotent; heuristics need no actor set-up
        return self._score(texts)

    def __call__(self, table: pa.Table) -> pa.Table:
        scores = self.score_texts(document_texts(table).to_pylist())
        return table.append_column(pa.field(QUALITY, pa.float32()), pa.array(scores, pa.float32()))
