"""Small real subsets of the shared pool for training tests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from training.datasets import Sample


def one_image_per_patient(pool: Sequence[Sample],
                          quotas: Iterable[tuple[str, str, int]]) -> list[Sample]:
    """Pick images in pool order, at most one per patient, by quota.

    Parameters
    ----------
    pool
        The manifest's samples.
    quotas
        ``(label, source substring, count)`` triples, filled in turn.

    Returns
    -------
    list of Sample
        The picked samples, quota by quota.
    """
    seen: set[str] = set()
    picked: list[Sample] = []
    for label, source, n in quotas:
        for s in pool:
            if n and s.label == label and source in s.source and s.patient_id not in seen:
                picked.append(s)
                seen.add(s.patient_id)
                n -= 1
    return picked
