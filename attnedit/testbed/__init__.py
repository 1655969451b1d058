"""Testbed: a synthetic world of coloured shapes, a detector that reads it back, and tiny trained models.

Why: quality claims about attention control need real (trained) models and automatic judging; both
must work offline. Training code lives in :mod:`attnedit.testbed.train` (imported lazily: it needs torch).
"""

from attnedit.testbed.world import (
    CAPTION_STYLES,
    COLOURS,
    DEFAULT_STYLE_PROBS,
    RELATIONS,
    SHAPES,
    VOCABULARY,
    ParsedPrompt,
    Relation,
    Scene,
    SceneObject,
    World,
    caption_for,
    parse_prompt,
    relation_holds,
    render,
)

__all__ = [
    "CAPTION_STYLES",
    "COLOURS",
    "DEFAULT_STYLE_PROBS",
    "RELATIONS",
    "SHAPES",
    "VOCABULARY",
    "ParsedPrompt",
    "Relation",
    "Scene",
    "SceneObject",
    "World",
    "caption_for",
    "parse_prompt",
    "relation_holds",
    "render",
]
