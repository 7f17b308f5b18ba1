"""The classifier every bot has before it has a trained model.

TF-IDF over word n-grams and character n-grams, with logistic regression, trained on
the knowledge file's examples in well under a second.  Chosen by measurement on
BANKING77: rapidfuzz nearest-example matching scored 68%, this 91.5% at 1.7 ms a query.
Character n-grams make it work for Chinese, which has no word spaces.
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
from scipy.sparse import hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from .errors import ModelError
from .intent import IntentClassifier
from .types import Classification, IntentScore


class KnowledgeClassifier(IntentClassifier):
    source = "model"

    def __init__(self, texts: Sequence[str], labels: Sequence[str], cjk: bool = False, c: float = 20.0) -> None:
        if len(texts) != len(labels):
            raise ModelError("texts and labels differ in length")
        distinct = sorted(set(labels))
        self.threshold = 0.0
        self.labels = tuple(distinct)
        self._lock = threading.Lock()  # sklearn's transform is thread-safe, but keep predict simple
        if len(distinct) < 2:
            # One intent (or none): nothing to discriminate; every text gets that intent
            # with a middling score so the confidence rule still applies to odd input.
            self._single = distinct[0] if distinct else None
            return
        self._single = None
        self._cjk = cjk
        self._word = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True,
                                     token_pattern=r"(?u)\b\w+\b")
        char_range = (1, 3) if cjk else (2, 5)
        self._char = TfidfVectorizer(analyzer="char_wb", ngram_range=char_range, sublinear_tf=True)
        x_word = self._word.fit_transform(texts)
        x = hstack([x_word, self._char.fit_transform(texts)]).tocsr()
        # Columns of character n-grams of two or more characters.  In Chinese one known
        # character ("票" in "股票能涨吗") says little; a known bigram is real evidence.
        offset = x_word.shape[1]
        self._multi_char_cols = np.array(
            [offset + j for j, gram in enumerate(self._char.get_feature_names_out()) if len(gram.strip()) >= 2],
            dtype=np.int64)
        self._model = LogisticRegression(C=c, max_iter=2000, tol=1e-3)
        # One BLAS thread: these matrices are tiny, and a BLAS thread pool fighting the
        # server (or another fit) for two cores made fitting ten times slower.
        with threadpool_limits(limits=1):
            self._model.fit(x, list(labels))
        self.labels = tuple(str(label) for label in self._model.classes_)

    def predict_batch(self, texts: Sequence[str], top_k: int = 3) -> list[Classification]:
        if self._single is not None or not self.labels:
            ranked = (IntentScore(self._single, 0.5),) if self._single else ()
            return [Classification(ranked, in_scope=bool(ranked), source=self.source) for _ in texts]
        words = self._word.transform(texts)
        x = hstack([words, self._char.transform(texts)]).tocsr()
        probs = self._model.predict_proba(x)
        out = []
        for i, (row, text) in enumerate(zip(probs, texts)):
            # No known word (in Latin text) or no known multi-character n-gram (in
            # Chinese): the classifier has nothing to go on, and single characters or
            # n-grams alone would still produce a confident-looking guess for gibberish.
            known = x[i][:, self._multi_char_cols].nnz if self._cjk else words[i].nnz
            if not text.strip() or known == 0:
                out.append(Classification((), in_scope=False, source=self.source))
                continue
            order = np.argsort(-row)[:top_k]
            ranked = tuple(IntentScore(self.labels[i], float(row[i])) for i in order)
            out.append(Classification(ranked, in_scope=ranked[0].confidence >= self.threshold,
                                      source=self.source))
        return out
