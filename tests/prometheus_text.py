"""Prometheus text exposition parsed into comparable samples, for exact assertions."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
#: (sample name, labels sorted by name) -> value
Samples = dict[tuple[str, Labels], float]


def parse_samples(text: str) -> Samples:
    """Every sample of a scrape, keyed by (sample name, sorted labels).

    ``*_created`` samples (wall-clock creation times) are left out: no test
    can assert them.
    """
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def only(samples: Samples, name: str) -> dict[Labels, float]:
    """The samples called ``name``, keyed by their labels."""
    return {labels: value for (n, labels), value in samples.items() if n == name}
