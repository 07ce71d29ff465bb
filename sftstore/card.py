"""The model card (`README.md`) written beside every artifact, in the Hub's format.

The card is valid Hub metadata and depends on the manifest alone (not on the time or the machine): a local
base model is described by its fingerprint, never by its path, and metrics go to `model-index` as well as
to the prose table.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .base_ids import spelled_like_hub_id

if TYPE_CHECKING:  # imported when a card is rendered: reading a store needs no huggingface_hub
    from huggingface_hub import EvalResult, ModelCardData

# The Hub pipeline tag of each task type that has one.
_PIPELINE_TAGS = {
    "token-classification": "token-classification",
    "sequence-classification": "text-classification",
    "masked-lm": "fill-mask",
}
# Metric name prefix -> (dataset type, dataset name) of the data the metric was measured on, and its readable form.
_EVAL_SETS = {"dev_": ("dev-set", "dev set", "dev "), "held_out_": ("held-out-text", "held-out text", "held-out ")}
_OTHER_SET = ("evaluation-set", "evaluation set", "")
_ACRONYMS = {"f1": "F1", "mlm": "MLM", "las": "LAS", "uas": "UAS"}
_MAX_DATA_FILES = 3  # more files than this are not listed in a dataset name


def _mapping(value: Any) -> dict:
    """`value` if it is a dict, else an empty one (manifest sections of an unexpected type are ignored)."""
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[str]:
    """The strings in `value` if it is a list, else none."""
    return [item for item in value if isinstance(item, str) and item] if isinstance(value, list) else []


def _hub_base_id(manifest: dict[str, Any]) -> str | None:
    """The base model's Hub id (as recorded, legacy ids included), or None for a local base.

    Judged from the id's spelling only, never from the file system, so that the card is the same on every
    machine (sftstore records a local base by its absolute path, which is never a Hub id).
    """
    base = _mapping(manifest.get("base_model")).get("id")
    return base if isinstance(base, str) and spelled_like_hub_id(base) else None


def _base_description(manifest: dict[str, Any], short: bool) -> str:
    """The base model in prose: its Hub id (linked unless `short`), or a local base (by its fingerprint unless
    `short`); never a local path."""
    base_id = _hub_base_id(manifest)
    if base_id is not None:
        return f"`{base_id}`" if short else f"[`{base_id}`](https://huggingface.co/{base_id})"
    if short:
        return "a local base model"
    base = _mapping(manifest.get("base_model"))
    arch, weights = (str(base.get(key) or "")[:12] for key in ("arch_digest", "weights_digest"))
    return f"a local base model (fingerprint arch `{arch}`, weights `{weights}`)"


def _pipeline_tag(manifest: dict[str, Any]) -> str | None:
    """The Hub pipeline tag of the delta's task type, if it has one."""
    task_type = manifest.get("task_type")
    return _PIPELINE_TAGS.get(task_type) if isinstance(task_type, str) else None


def _languages(manifest: dict[str, Any]) -> list[str]:
    """A language delta's languages; a task delta's, else its source languages from `lineage`."""
    languages = _strings(manifest.get("languages"))
    if languages:
        return languages
    if manifest.get("kind") == "language":
        return _strings([manifest.get("language")])
    return _strings(_mapping(manifest.get("lineage")).get("source_languages"))


def _data_names(data: Any) -> list[str]:
    """The file names in a `training.data` record (file records, possibly nested in lists)."""
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        return [data["name"]]
    return [name for item in data for name in _data_names(item)] if isinstance(data, list) else []


def _short_file_list(names: list[str]) -> str | None:
    """The names joined, if there are a few and all are plain relative names (never a local path)."""
    names = sorted(set(names))
    plain = all(name and not name.startswith(("/", "~", ".")) and "\\" not in name and ":" not in name
                and ".." not in name and len(name) <= 64 for name in names)
    return ", ".join(names) if names and plain and len(names) <= _MAX_DATA_FILES else None


def _eval_set(prefix: str, training: dict[str, Any]) -> tuple[str, str, str]:
    """The (dataset type, dataset name, readable prefix) of a metric with `prefix`, naming its files when known."""
    dataset_type, dataset_name, readable = _EVAL_SETS.get(prefix, _OTHER_SET)
    data = training.get("data")
    if prefix == "dev_":
        files = _short_file_list(_data_names(_mapping(data).get("dev")))
    elif prefix == "held_out_":  # a language delta's held-out lines come from its training text
        files = _short_file_list(_data_names(data)) if isinstance(data, list) else None
    else:
        files = None
    return dataset_type, f"{dataset_name} ({files})" if files else dataset_name, readable


def _metric_label(words: str) -> str:
    """`mlm_loss` -> `MLM loss`."""
    return " ".join(_ACRONYMS.get(word, word) for word in words.split("_") if word)


def _is_finite_number(value: Any) -> bool:
    """Whether `value` is an int or a finite float (not a bool)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _numeric_metrics(manifest: dict[str, Any]) -> dict[str, float | int]:
    """The manifest's metrics with a finite number as value."""
    metrics = _mapping(manifest.get("metrics"))
    return {name: value for name, value in metrics.items() if isinstance(name, str) and _is_finite_number(value)}


def _eval_results(manifest: dict[str, Any]) -> list[EvalResult]:
    """One `EvalResult` per numeric metric (`dev_f1` -> metric type `f1` on the dev set)."""
    from huggingface_hub import EvalResult

    task_type = manifest.get("task_type")
    task = _pipeline_tag(manifest) or (task_type if isinstance(task_type, str) and task_type else "other")
    training = _mapping(manifest.get("training"))
    results = []
    for name, value in _numeric_metrics(manifest).items():
        prefix = next((p for p in _EVAL_SETS if name.startswith(p) and len(name) > len(p)), "")
        metric_type = name[len(prefix):]
        dataset_type, dataset_name, readable = _eval_set(prefix, training)
        results.append(EvalResult(task_type=task, dataset_type=dataset_type, dataset_name=dataset_name,
                                  metric_type=metric_type, metric_name=readable + _metric_label(metric_type),
                                  metric_value=value))
    return results


def _card_data(manifest: dict[str, Any]) -> ModelCardData:
    """The card's YAML front matter: library, base model (a Hub id or none), languages, pipeline tag, licence,
    tags and `model-index`."""
    from huggingface_hub import ModelCardData

    kind = manifest.get("kind")
    tags = ["sparse-fine-tuning", "sftstore", f"{kind}-delta"]
    if kind == "task" and isinstance(manifest.get("task"), str):
        tags.append(manifest["task"])
    license_ = manifest.get("license")
    results = _eval_results(manifest)
    return ModelCardData(
        library_name="sftstore",
        base_model=_hub_base_id(manifest),
        language=_languages(manifest) or None,
        pipeline_tag=_pipeline_tag(manifest),
        license=license_ if isinstance(license_, str) and license_ else "other",
        tags=tags,
        model_name=_reference(manifest) if results else None,
        eval_results=results or None,
    )


def _reference(manifest: dict[str, Any]) -> str:
    """The delta's store reference without a version: `lang/hau`, `task/ner`."""
    kind = manifest.get("kind")
    return f"{'lang' if kind == 'language' else 'task'}/{manifest.get('language' if kind == 'language' else 'task')}"


def _size(manifest: dict[str, Any]) -> str:
    """`1,200 of 100,000 (1.200%)`, or the manifest's values as they are if they are not numbers."""
    nnz, total, density = (manifest.get(key) for key in ("nnz", "num_parameters", "density"))
    if all(_is_finite_number(value) for value in (nnz, total, density)):
        return f"{nnz:,} of {total:,} ({density:.3%})"
    return f"{nnz} of {total} ({density})"


def _table_rows(manifest: dict[str, Any]) -> list[str]:
    """The prose table: size, dtype, task type, labels, masks, metrics and lineage."""
    rows = [
        "| field | value |",
        "| --- | --- |",
        f"| non-zeros | {_size(manifest)} |",
        f"| values dtype | {manifest.get('values_dtype')} |",
        f"| task type | {manifest.get('task_type')} |",
    ]
    labels = _strings(manifest.get("labels"))
    if labels:
        rows.append(f"| labels | {', '.join(labels)} |")
    if manifest.get("masks_sha256"):
        rows.append("| sub-network masks | `sft_masks.safetensors` (per-language masks, for analysis: "
                    "`sft overlap --masks`) |")
    for section in ("metrics", "lineage"):
        for key, value in _mapping(manifest.get(section)).items():
            rows.append(f"| {section}: {key} | {value} |")
    return rows


def render_model_card(manifest: dict[str, Any]) -> str:
    """A model card with YAML front matter (library, base model, languages, pipeline tag, licence, tags,
    model-index) and prose, from a manifest alone."""
    kind = str(manifest.get("kind"))
    name = manifest.get("language" if kind == "language" else "task")
    base_id = _hub_base_id(manifest)
    method = _mapping(manifest.get("method")).get("name")
    lines = [
        "---",
        _card_data(manifest).to_yaml(),
        "---",
        "",
        f"# {kind.capitalize()} delta `{name}` for {_base_description(manifest, short=True)}",
        "",
        f"A sparse fine-tuning (composable sparse difference vector) of {_base_description(manifest, short=False)}, "
        f"made with [sftstore](https://pypi.org/project/sftstore/) using method `{method}`.",
        "",
        *_table_rows(manifest),
        "",
        "## Usage",
        "",
        "```bash",
        "sft import ./this-directory",
        f"sft compose --base {base_id or 'BASE'} --{'lang' if kind == 'language' else 'task'} {name} --out composed/",
        "```",
        "",
    ]
    if base_id is None:
        lines += ["`BASE` is the local base model this delta was made for (its fingerprint must match).", ""]
    lines += [f"In Python: `SparseDelta.from_pretrained(path).apply(model)`; the store reference is "
              f"`{_reference(manifest)}`.", ""]
    return "\n".join(lines)
