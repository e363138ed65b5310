"""seqrec-hf: Hugging Face-native sequential (next-item) recommendation.

Importing the package registers the config, models, item tokenizer, the Auto classes and the
`"next-item-recommendation"` pipeline task with transformers.
"""

from collections import OrderedDict

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_seqrec import SeqRecConfig
from .modeling_seqrec import (
    NextItemPredictionOutput,
    SeqRecForNextItemPrediction,
    SeqRecModel,
    SeqRecModelOutput,
    SeqRecPreTrainedModel,
)
from .pipeline_seqrec import NextItemRecommendationPipeline
from .tokenization_seqrec import ItemTokenizer

__version__ = "0.1.0"


class AutoModelForNextItemPrediction(_BaseAutoModelClass):
    """Auto class for next-item recommendation heads (`SeqRecForNextItemPrediction` for `model_type="seqrec"`)."""

    _model_mapping = _LazyAutoMapping(CONFIG_MAPPING_NAMES, OrderedDict())


# Where seqrec_hf is importable, everything resolves locally. The head is also registered as a causal LM
# (it is one: next-token prediction over items) so `AutoModelForCausalLM` and remote-code loads find it.
AutoConfig.register(SeqRecConfig.model_type, SeqRecConfig, exist_ok=True)
AutoModel.register(SeqRecConfig, SeqRecModel, exist_ok=True)
AutoModelForCausalLM.register(SeqRecConfig, SeqRecForNextItemPrediction, exist_ok=True)
AutoModelForNextItemPrediction.register(SeqRecConfig, SeqRecForNextItemPrediction, exist_ok=True)
AutoTokenizer.register(SeqRecConfig, slow_tokenizer_class=ItemTokenizer, exist_ok=True)

# save_pretrained copies the modeling/config/tokenizer files and writes `auto_map`, so
# `from_pretrained(..., trust_remote_code=True)` works where this package is not installed.
SeqRecConfig.register_for_auto_class()
SeqRecModel.register_for_auto_class("AutoModel")
SeqRecForNextItemPrediction.register_for_auto_class("AutoModelForCausalLM")
ItemTokenizer.register_for_auto_class("AutoTokenizer")

PIPELINE_REGISTRY.register_pipeline(
    "next-item-recommendation",
    pipeline_class=NextItemRecommendationPipeline,
    pt_model=AutoModelForNextItemPrediction,
    type="text",
)

__all__ = [
    "AutoModelForNextItemPrediction",
    "ItemTokenizer",
    "NextItemPredictionOutput",
    "NextItemRecommendationPipeline",
    "SeqRecConfig",
    "SeqRecForNextItemPrediction",
    "SeqRecModel",
    "SeqRecModelOutput",
    "SeqRecPreTrainedModel",
]
