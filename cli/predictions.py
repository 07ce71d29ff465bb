"""Printing predictions (`sft compose --text`): a table of entities, or a label with every label's score."""

from __future__ import annotations

from sftstore.predict import Prediction, SequencePrediction

from .common import console, new_table, print_table


def print_prediction(prediction: Prediction) -> None:
    """Entities (text, label, score, character span) in input order, or the labels by score, most probable first."""
    if isinstance(prediction, SequencePrediction):
        table = new_table("label", "score", right=("score",))
        for label, score in sorted(prediction.scores.items(), key=lambda item: -item[1]):
            table.add_row(label, f"{score:.3f}")
        print_table(table, f"label: {prediction.label} (score {prediction.score:.3f})")
        return
    count = len(prediction.entities)
    if not count:
        console.print("no entities")
        return
    table = new_table("text", "label", "score", "chars", right=("score", "chars"))
    for entity in prediction.entities:
        table.add_row(entity.text, entity.label, f"{entity.score:.3f}", f"{entity.start}-{entity.end}")
    print_table(table, f"{count} entit{'y' if count == 1 else 'ies'}")
