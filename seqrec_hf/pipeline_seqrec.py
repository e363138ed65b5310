"""The `next-item-recommendation` pipeline: raw item histories in, ranked raw item ids out."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline


class NextItemRecommendationPipeline(Pipeline):
    """Recommend the next items for one history or a list of histories.

    Each input is a whitespace-joined string of raw item ids, a list of raw item ids, or a dict
    `{"items": ..., "timestamps": [...], "query_timestamp": int}` for time-aware models. Returns, per input,
    `[{"item": raw_id, "score": float}, ...]` best first; items of the history are excluded by default.

    Example:
        >>> rec = pipeline("next-item-recommendation", model="path/or/repo")
        >>> rec(["B0001 B0042 B0007"], top_k=10)
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model.check_tokenizer(self.tokenizer)

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        exclude_history: bool | None = None,
        allowed_items: list[str] | None = None,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(f"next-item-recommendation got unexpected arguments: {sorted(kwargs)}")
        preprocess = {} if max_length is None else {"max_length": max_length}
        forward: dict[str, Any] = {}
        if top_k is not None:
            forward["top_k"] = top_k
        if exclude_history is not None:
            forward["exclude_history"] = exclude_history
        if allowed_items is not None:
            forward["allowed_items"] = self.tokenizer.convert_items_to_ids(allowed_items, strict=True)
        return preprocess, forward, {}

    def preprocess(self, history: Any, max_length: int | None = None) -> dict[str, torch.Tensor]:
        timestamps = query = None
        if isinstance(history, dict):
            unknown = set(history) - {"items", "timestamps", "query_timestamp"}
            if "items" not in history or unknown:
                raise ValueError(
                    "a dict input needs 'items' and may have 'timestamps' and 'query_timestamp'"
                    + (f"; unexpected keys {sorted(unknown)}" if unknown else "")
                )
            history, timestamps, query = (
                history["items"],
                history.get("timestamps"),
                history.get("query_timestamp"),
            )
        items = history.split() if isinstance(history, str) else list(history)
        return self.tokenizer(
            [items],  # a batch of one history
            timestamps=None if timestamps is None else [list(timestamps)],
            query_timestamps=None if query is None else [query],
            max_length=max_length,
            return_tensors="pt",
        ).data

    def _forward(self, model_inputs: dict[str, torch.Tensor], top_k: int = 10, **kwargs: Any) -> dict:
        item_ids, scores = self.model.recommend(**model_inputs, top_k=top_k, **kwargs)
        return {"item_ids": item_ids, "scores": scores}

    def postprocess(self, model_outputs: dict) -> list[dict[str, Any]]:
        ids = model_outputs["item_ids"][0].tolist()
        scores = model_outputs["scores"][0].tolist()
        items = self.tokenizer.convert_ids_to_items([i for i in ids if i >= 0])
        return [{"item": item, "score": float(score)} for item, score in zip(items, scores)]
