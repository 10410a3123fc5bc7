"""The dataset card: template, renderer and plots."""

from dataset_card.card import render_folder_card

__all__ = ["render_folder_card"]
