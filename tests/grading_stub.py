"""A stand-in for the verifier in tests that train or probe a random tiny model."""

from __future__ import annotations


def alternate_grades(monkeypatch) -> None:
    """Random tiny models never answer correctly; alternate verdicts (right, wrong, right, ...) so every
    method gets a signal (GRPO needs mixed rewards within a group, SGSD both outcome signs)."""
    import sgsd.verifier as verifier

    class Verdict:
        def __init__(self, ok):
            self.correct, self.reason, self.extracted = ok, None, None

    monkeypatch.setattr(
        verifier, "grade_many", lambda pairs, **kw: [Verdict(i % 2 == 0) for i in range(len(pairs))]
    )
