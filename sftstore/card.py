"""The model card (`README.md`) written beside every artifact, in the Hub's format."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCardData


def _model_link(base: str) -> str:
    """A Hub link for a Hub id; a local directory is named, not linked."""
    is_hub_id = not base.startswith(("/", ".", "~")) and base.count("/") <= 1
    return f"[`{base}`](https://huggingface.co/{base})" if is_hub_id else f"`{base}`"


def render_model_card(manifest: dict[str, Any]) -> str:
    """A model card with YAML front matter (library, base model, languages, tags, licence) from a manifest."""
    kind, base = manifest["kind"], manifest["base_model"]["id"]
    name = manifest["language"] if kind == "language" else manifest["task"]
    languages = manifest.get("languages") or ([manifest["language"]] if manifest.get("language") else [])
    tags = ["sparse-fine-tuning", "sftstore", f"{kind}-delta"]
    if kind == "task":
        tags.append(manifest["task"])
    data = ModelCardData(
        library_name="sftstore",
        base_model=base,
        language=languages or None,
        license=manifest.get("license") or "other",
        tags=tags,
    )
    ref = f"{'lang' if kind == 'language' else 'task'}/{name}"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {kind.capitalize()} delta `{name}` for `{base}`",
        "",
        f"A sparse fine-tuning (composable sparse difference vector) of {_model_link(base)}, "
        f"made with [sftstore](https://pypi.org/project/sftstore/) using method `{manifest['method'].get('name')}`.",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| non-zeros | {manifest['nnz']:,} of {manifest['num_parameters']:,} ({manifest['density']:.3%}) |",
        f"| values dtype | {manifest['values_dtype']} |",
        f"| task type | {manifest.get('task_type')} |",
    ]
    if manifest.get("labels"):
        lines.append(f"| labels | {', '.join(manifest['labels'])} |")
    if manifest.get("masks_sha256"):
        lines.append("| sub-network masks | `sft_masks.safetensors` (per-language masks, for analysis: `sft overlap --masks`) |")
    for section in ("metrics", "lineage"):
        for key, value in (manifest.get(section) or {}).items():
            lines.append(f"| {section}: {key} | {value} |")
    lines += [
        "",
        "## Usage",
        "",
        "```bash",
        "sft import ./this-directory",
        f"sft compose --base {base} --{'lang' if kind == 'language' else 'task'} {name} --out composed/",
        "```",
        "",
        f"In Python: `SparseDelta.from_pretrained(path).apply(model)`; the store reference is `{ref}`.",
        "",
    ]
    return "\n".join(lines)
