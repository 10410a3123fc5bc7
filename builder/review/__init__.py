"""``spa-vl review``: people check the judge on a blind, seeded sample, and the card says how often it was right.

    session = open_review("out/spa_vl", n=500, seed=0)     # review/sample.json drawn on first use
    with ReviewServer(port=0).running(session) as server:   # the page at server.url
        ...
    make_report("out/spa_vl").report["judge_vs_people"]     # review/report.json, plot, card section
"""

from builder.review.server import ReviewServer
from builder.review.session import ReviewSession, make_report, open_review

__all__ = ["ReviewServer", "ReviewSession", "make_report", "open_review"]
