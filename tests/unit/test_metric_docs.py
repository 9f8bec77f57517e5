"""Every metric is documented: the README's table is the one generated from the definitions."""

from pathlib import Path

from batchgate_server.observability.metrics import METRICS, Metrics, metric_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_holds_the_generated_metric_table():
    assert metric_table() in README.read_text(), \
        "regenerate the table: python -m batchgate_server.observability.metrics"


def test_every_defined_metric_is_exposed():
    text = Metrics().scrape().decode()
    for m in METRICS:
        assert f"# HELP {m.name}" in text or m.kind.__name__ == "GaugeMetricFamily"
