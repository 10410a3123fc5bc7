"""The dataset card: its renderer (and, later, its template and plots)."""

from dataset_card.card import render_card

__all__ = ["render_card"]
