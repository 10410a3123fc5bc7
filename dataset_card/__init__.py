"""The dataset card: its template, its renderer and the plots it embeds.

    from dataset_card import render_folder_card
    render_folder_card(DatasetFolder.open("out/spa_vl"))
"""

__all__ = ["render_folder_card"]


def __getattr__(name: str):
    if name == "render_folder_card":  # the renderer imports datasets, jinja2 and matplotlib: loaded on first use
        from dataset_card.card import render_folder_card

        return render_folder_card
    raise AttributeError(f"module 'dataset_card' has no attribute {name!r}")
