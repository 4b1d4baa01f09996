"""`mils report`: a dataset as a static HTML report folder a person opens in a browser.

One folder, no server, no network: ``index.html`` with the gallery (thumbnails, final caption,
score, rounds, stop reason; an item's candidates and trajectory on click), the dataset's plots
(matplotlib SVG), the shards and the quarantine with their manifests, and the dataset card. The
gallery's data sit in small script files (``data/``) loaded as pages are opened, so the page stays
light however many items the gallery holds; past ``sample`` items it shows an evenly spaced sample
(see ``dataset.choose``). It reads local and object-store datasets alike and writes its folder
to either.
"""

from mils_pipeline.html_report.dataset import SORTS, ReportError
from mils_pipeline.html_report.page import DEFAULT_SAMPLE, Report, report_location, write_report

__all__ = ["DEFAULT_SAMPLE", "SORTS", "Report", "ReportError", "report_location", "write_report"]
