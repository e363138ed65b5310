import pytest

from seqrec_hf import SeqRecConfig


def test_defaults_and_round_trip(tmp_path):
    config = SeqRecConfig(vocab_size=100, use_time_bias=True)
    assert config.tie_word_embeddings is True
    assert config.model_type == "seqrec"
    config.save_pretrained(tmp_path)
    loaded = SeqRecConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 65),  # not divisible by 2 heads
        ("num_attention_heads", 0),
        ("num_hidden_layers", 0),
        ("vocab_size", -1),
        ("vocab_size", 2),  # only special tokens
        ("intermediate_size", 0),
        ("max_position_embeddings", 0),
        ("hidden_dropout_prob", 1.0),
        ("attention_dropout", -0.1),
        ("layer_norm_eps", 0.0),
        ("initializer_range", -1.0),
        ("time_bucket_base", 1.0),
        ("time_num_buckets", 0),
        ("hidden_act", "tanhh"),
        ("loss_type", "bce"),
        ("pad_token_id", 5),
        ("loss_chunk_size", 0),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SeqRecConfig(**{field: value})


def test_invalid_config_json_fails_on_load(tmp_path):
    SeqRecConfig(vocab_size=10).save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 63')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="hidden_size"):
        SeqRecConfig.from_pretrained(tmp_path)
