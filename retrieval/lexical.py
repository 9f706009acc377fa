"""BM25 over chunk term counts, with the statistics of each query computed over the permitted chunks.

Why this is written here rather than taken from bm25s or a search engine: bm25s precomputes every
(term, document) score at index time ("eager" scoring), so it can neither take documents in
incrementally nor change the collection its statistics describe; engines such as tantivy keep
global statistics. Enclave needs both: ingest adds and removes chunks incrementally, and a reader's
BM25 must be computed as if the chunks they may not read did not exist - otherwise the idf of a
rare word would reveal that a restricted document contains it. Here the index keeps raw term
frequencies in a term-major sparse matrix; a query reads only its terms' postings, masks them with
the reader's permitted rows, and derives N, df and the average length from that mask.

Rows are appended for new chunks and tombstoned for removed ones; pending rows are merged into the
term-major matrix when the index is saved (at publish) or first searched, never per query.

Fields: a chunk's heading path ("Title > Section > Entry") is a second field whose terms count
``field_weight`` times a body occurrence, in the term frequency and in the length (BM25F with one
shared length normalisation, folded into the stored counts at index time: one matrix, so a query
costs what it did with one field). The weight is part of the index; an index saved with another
weight is rebuilt from the rows by the store (tokenizing only, no embedding).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

K1 = 1.2
B = 0.75


class LexicalIndex:
    def __init__(self, field_weight: float = 0.0) -> None:
        self.field_weight = float(field_weight)  # weight of the heading field's terms (0: not indexed)
        self.vocab: dict[str, int] = {}
        self.chunk_ids = np.empty(0, dtype=np.int64)
        self.lengths = np.empty(0, dtype=np.float32)
        self.alive = np.empty(0, dtype=bool)
        self._matrix = sp.csc_matrix((0, 0), dtype=np.float32)  # rows x terms, merged part
        self._pending: list[tuple[int, list[int], list[int]]] = []  # (row, term ids, counts)
        self._row_of: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.alive.sum())

    def ids(self) -> np.ndarray:
        return self.chunk_ids[self.alive]

    # Updates ---------------------------------------------------------------------------------
    def add(
        self, chunk_ids: Sequence[int], token_lists: Iterable[list[str]],
        field_token_lists: Iterable[list[str]] | None = None,
    ) -> None:
        """Index chunks: body tokens, and optionally each chunk's heading-field tokens."""
        start = len(self.chunk_ids)
        new_ids, new_lengths = [], []
        token_lists = list(token_lists)
        fields = list(field_token_lists) if field_token_lists is not None else [[]] * len(token_lists)
        weight = self.field_weight
        for offset, (chunk_id, tokens, field_tokens) in enumerate(zip(chunk_ids, token_lists, fields)):
            if chunk_id in self._row_of:
                raise ValueError(f"chunk {chunk_id} is already indexed")
            counts: Counter = Counter(tokens)
            length = float(len(tokens))
            if weight and field_tokens:
                for term in field_tokens:
                    counts[term] += weight
                length += weight * len(field_tokens)
            terms = [self.vocab.setdefault(term, len(self.vocab)) for term in counts]
            self._pending.append((start + offset, terms, list(counts.values())))
            self._row_of[int(chunk_id)] = start + offset
            new_ids.append(chunk_id)
            new_lengths.append(length)
        self.chunk_ids = np.concatenate([self.chunk_ids, np.asarray(new_ids, dtype=np.int64)])
        self.lengths = np.concatenate([self.lengths, np.asarray(new_lengths, dtype=np.float32)])
        self.alive = np.concatenate([self.alive, np.ones(len(new_ids), dtype=bool)])

    def remove(self, chunk_ids: Iterable[int]) -> int:
        removed = 0
        for chunk_id in chunk_ids:
            row = self._row_of.pop(int(chunk_id), None)
            if row is not None:
                self.alive[row] = False
                removed += 1
        return removed

    def _merge(self) -> None:
        rows_total, terms_total = len(self.chunk_ids), len(self.vocab)
        if not self._pending and self._matrix.shape == (rows_total, terms_total):
            return
        rows = np.fromiter((r for r, terms, _ in self._pending for _ in terms), dtype=np.int64)
        cols = np.fromiter((t for _, terms, _ in self._pending for t in terms), dtype=np.int64)
        vals = np.fromiter((c for _, _, counts in self._pending for c in counts), dtype=np.float32)
        old = self._matrix.tocoo()
        self._matrix = sp.csc_matrix(
            (np.concatenate([old.data, vals]), (np.concatenate([old.row, rows]), np.concatenate([old.col, cols]))),
            shape=(rows_total, terms_total), dtype=np.float32,
        )
        self._pending = []

    def compact(self) -> None:
        """Drop tombstoned rows (done at save time once they are a large share of the index)."""
        self._merge()
        keep = np.flatnonzero(self.alive)
        self._matrix = self._matrix[keep].tocsc()
        self.chunk_ids, self.lengths = self.chunk_ids[keep], self.lengths[keep]
        self.alive = np.ones(len(keep), dtype=bool)
        self._row_of = {int(c): i for i, c in enumerate(self.chunk_ids)}

    # Search ----------------------------------------------------------------------------------
    def row_positions(self, sorted_ids: np.ndarray) -> np.ndarray:
        """Position of each row's chunk id in ``sorted_ids`` (-1 when absent or tombstoned)."""
        pos = np.searchsorted(sorted_ids, self.chunk_ids)
        pos = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        found = (len(sorted_ids) > 0) & self.alive
        if len(sorted_ids):
            found &= sorted_ids[pos] == self.chunk_ids
        return np.where(found, pos, -1)

    def search(self, tokens: list[str], k: int, row_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, chunk ids) among rows where ``row_mask`` is true (all live rows if None)."""
        self._merge()
        mask = self.alive if row_mask is None else (self.alive & row_mask)
        n_docs = int(mask.sum())
        query = Counter(t for t in tokens if t in self.vocab)
        if n_docs == 0 or not query or k <= 0:
            return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
        avgdl = float(self.lengths[mask].mean()) or 1.0
        indptr, indices, data = self._matrix.indptr, self._matrix.indices, self._matrix.data
        matched = False
        accumulated = np.zeros(len(self.chunk_ids), dtype=np.float32)
        everything = n_docs == len(self.chunk_ids)  # no filter, no tombstones: skip the masking
        length_norm = np.float32(K1 * B / avgdl)
        for term, query_count in query.items():
            column = self.vocab[term]
            rows = indices[indptr[column] : indptr[column + 1]]
            tf = data[indptr[column] : indptr[column + 1]]
            if not everything:
                keep = mask[rows]
                rows, tf = rows[keep], tf[keep]
            if len(rows) == 0:
                continue
            idf = np.float32(np.log1p((n_docs - len(rows) + 0.5) / (len(rows) + 0.5)))
            norm = tf + np.float32(K1 * (1.0 - B)) + length_norm * self.lengths[rows]
            accumulated[rows] += query_count * idf * tf * (K1 + 1.0) / norm  # rows are unique per term
            matched = True
        if not matched:
            return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
        candidates = np.flatnonzero(accumulated)  # a linear scan beats sorting the postings
        cand_scores = accumulated[candidates]
        if len(candidates) > k:
            top = np.argpartition(-cand_scores, k - 1)[:k]
            candidates, cand_scores = candidates[top], cand_scores[top]
        # Ties broken by chunk id so results are deterministic.
        order = np.lexsort((self.chunk_ids[candidates], -cand_scores))
        return cand_scores[order], self.chunk_ids[candidates[order]]

    # Persistence -----------------------------------------------------------------------------
    def serialize(self) -> bytes:
        if len(self.alive) and (~self.alive).mean() > 0.2:
            self.compact()
        self._merge()
        buffer = io.BytesIO()
        terms = [None] * len(self.vocab)
        for term, column in self.vocab.items():
            terms[column] = term
        np.savez(
            buffer,
            data=self._matrix.data, indices=self._matrix.indices, indptr=self._matrix.indptr,
            shape=np.asarray(self._matrix.shape, dtype=np.int64), chunk_ids=self.chunk_ids, lengths=self.lengths,
            alive=self.alive, field_weight=np.asarray(self.field_weight, dtype=np.float64),
            vocab=np.frombuffer(json.dumps(terms, ensure_ascii=False).encode(), dtype=np.uint8),
        )
        return buffer.getvalue()

    @classmethod
    def deserialize(cls, data: bytes) -> "LexicalIndex":
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        # Indexes saved before fields existed hold body terms only: weight 0.
        index = cls(float(arrays["field_weight"]) if "field_weight" in arrays.files else 0.0)
        terms = json.loads(arrays["vocab"].tobytes().decode())
        index.vocab = {term: column for column, term in enumerate(terms)}
        index._matrix = sp.csc_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=tuple(arrays["shape"]))
        index.chunk_ids, index.lengths, index.alive = arrays["chunk_ids"], arrays["lengths"], arrays["alive"]
        index._row_of = {int(c): i for i, c in enumerate(index.chunk_ids) if index.alive[i]}
        return index
