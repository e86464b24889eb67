"""Parse a Label Studio label config into what the detector needs.

We look for control tags that livetrain can learn (``RectangleLabels`` for boxes, ``PolygonLabels``
and ``BrushLabels`` for masks) whose ``toName`` is an ``Image`` tag. Everything else in the config
(Choices, TextArea, ...) is ignored, so a project can mix livetrain with manual-only fields.

One project, one model, one control: livetrain trains and predicts the **primary** control, the first
supported tag in document order that does not say ``model_skip="true"``. The other supported tags are
left to people (their results are neither learned from nor predicted). So a config with RectangleLabels
then PolygonLabels on one image trains a Faster R-CNN on the rectangles; add ``model_skip="true"`` to the
RectangleLabels tag to train a Mask R-CNN on the polygons instead. (``model_skip`` is the attribute
Label Studio's own ML backend examples use for the same purpose.)
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

from backend.errors import LabelConfigError

# control tag -> Label Studio result type and the kind of model that learns it
SUPPORTED_TAGS = {
    "RectangleLabels": ("rectanglelabels", "boxes"),
    "PolygonLabels": ("polygonlabels", "masks"),
    "BrushLabels": ("brushlabels", "masks"),
}

HELP = (
    "livetrain needs a RectangleLabels (boxes), PolygonLabels or BrushLabels (masks) tag whose toName "
    'is an Image tag, with at least one <Label value="...">, e.g. '
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="Cat"/></RectangleLabels></View>'
)


@dataclass(frozen=True)
class ControlTag:
    """One labeling tag bound to an image: what we predict into and learn from."""

    from_name: str  # the control tag's name (``from_name`` in results)
    to_name: str  # the Image tag's name
    tag_type: str  # RectangleLabels / PolygonLabels / BrushLabels
    value_key: str  # task data key of the image ("image" for value="$image")
    labels: tuple[str, ...]
    # model class name -> Label Studio label, from ``predicted_values="a,b"`` on <Label>
    predicted_values: dict[str, str] = field(default_factory=dict)
    score_threshold: float | None = None  # ``model_score_threshold`` attribute
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def result_type(self) -> str:
        return SUPPORTED_TAGS[self.tag_type][0]

    @property
    def task(self) -> str:
        """``boxes`` (Faster R-CNN) or ``masks`` (Mask R-CNN)."""
        return SUPPORTED_TAGS[self.tag_type][1]

    def label_for(self, model_class: str) -> str | None:
        """The Label Studio label a model class name maps to, or None if it maps to none."""
        if model_class in self.labels:
            return model_class
        return self.predicted_values.get(model_class)


@dataclass(frozen=True)
class LabelConfig:
    controls: tuple[ControlTag, ...]

    @property
    def primary(self) -> ControlTag:
        """The tag livetrain trains and predicts: the first supported one without ``model_skip="true"``."""
        return self.controls[0]


def parse_label_config(xml: str) -> LabelConfig:
    """Parse ``xml``; raise LabelConfigError (HTTP 400) with a fix-it message when unusable."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty. " + HELP)
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        # Entity expansion is how XML bombs work; a Label Studio config never needs it.
        raise LabelConfigError("the label config must not contain DOCTYPE or ENTITY declarations")
    try:
        root = ET.fromstring(xml)
    except (ET.ParseError, ValueError) as exc:  # ValueError: lone surrogates ("\ud800") cannot be encoded for the parser
        raise LabelConfigError(f"the label config is not valid XML ({str(exc)[:200]}). " + HELP) from None

    names = Counter(el.get("name") for el in root.iter() if el.get("name"))
    duplicates = sorted(name for name, count in names.items() if count > 1)
    if duplicates:  # Label Studio refuses these too: results could not say which tag they belong to
        raise LabelConfigError(f"the label config has several tags named {', '.join(map(repr, duplicates[:5]))}: "
                               "every name must be unique")
    images = {el.get("name"): el for el in root.iter() if el.tag == "Image" and el.get("name")}
    controls, skipped, problems = [], [], []
    for el in root.iter():
        if el.tag not in SUPPORTED_TAGS:
            continue
        where = f"<{el.tag} name={el.get('name')!r}>"
        if not el.get("name"):
            problems.append(f"<{el.tag}> has no name")
            continue
        image = images.get(el.get("toName", ""))
        if image is None:
            problems.append(f"{where} has toName={el.get('toName')!r}, which is no Image tag's name")
            continue
        value = image.get("value", "")
        labels, predicted = [], {}
        for label in el.iter("Label"):
            name = label.get("value")
            if not name:
                continue
            labels.append(name)
            for alias in (label.get("predicted_values") or "").split(","):
                if alias.strip():
                    predicted[alias.strip()] = name
        if not labels:
            problems.append(f'{where} has no <Label value="...">')
            continue
        if (el.get("model_skip") or "").strip().lower() in ("true", "1", "yes"):
            skipped.append(el.get("name", el.tag))
            continue
        threshold = el.get("model_score_threshold")
        try:
            threshold = float(threshold) if threshold is not None else None
        except ValueError:
            raise LabelConfigError(
                f"model_score_threshold={threshold!r} on <{el.tag} name={el.get('name')!r}> is not a number"
            ) from None
        if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise LabelConfigError(f"model_score_threshold={el.get('model_score_threshold')!r} on {where} must be "
                                   "a number between 0 and 1")
        controls.append(
            ControlTag(
                from_name=el.get("name", ""),
                to_name=image.get("name"),
                tag_type=el.tag,
                value_key=value[1:] if value.startswith("$") else value,
                labels=tuple(dict.fromkeys(labels)),  # de-duplicated, order kept
                predicted_values=predicted,
                score_threshold=threshold,
                attrs=dict(el.attrib),
            )
        )
    if not controls and skipped:
        raise LabelConfigError(f"every supported labeling tag has model_skip=\"true\" ({', '.join(skipped)}): "
                               "remove it from the tag livetrain should learn")
    if not controls:
        found = sorted({str(el.tag) for el in root.iter()} - {"View", "Header", "Label"})
        why = f" ({'; '.join(problems[:5])})" if problems else ""
        raise LabelConfigError(f"no supported labeling tag found (tags in config: {', '.join(found[:20]) or 'none'}){why}. "
                               + HELP)
    return LabelConfig(controls=tuple(controls))
