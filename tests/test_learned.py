"""The learned predictor: record router outputs, distil, save, load, predict (one process)."""

import pytest
import torch

from ds_moe_replicate import ReplicationConfig, ReplicationConfigError
from ds_moe_replicate.learned import RouterDistiller, record_router_outputs, train_distiller
from ds_moe_replicate.tiny_switch import TinySwitchConfig, build_tiny_switch, topic_tokens


def test_distil_save_load_and_predict(tmp_path):
    cfg = TinySwitchConfig(hidden=32, ffn=64, blocks=4, num_experts=4, vocab=256, topic_tokens=32)
    model = build_tiny_switch(cfg, ep_size=1, set_groups=False)
    batches = [topic_tokens(cfg, 2, 64, 0.7, seed=i, topic=i % 2) for i in range(6)]
    record = record_router_outputs(model, model.embed, model.moe_layers(), batches)
    assert record.emb_NH.shape == (6 * 128, 32) and record.experts_NLK.shape == (6 * 128, 2, 1)
    distiller, agreement = train_distiller(record, 4, epochs=40)
    assert len(agreement) == 2 and min(agreement) > 0.8  # held-out tokens
    path = tmp_path / "p.pt"
    distiller.save(str(path))
    loaded = RouterDistiller.load(str(path))
    emb = model.embed(topic_tokens(cfg, 2, 64, 0.7, seed=99, topic=1)).reshape(-1, 32)
    counts = loaded.predict_counts(emb)
    assert counts.shape == (2, 4) and counts.sum(dim=1).tolist() == [128, 128]
    assert torch.equal(counts, distiller.predict_counts(emb))
    # The hot expert of topic 1 in each layer is what the prediction puts first.
    for layer in range(2):
        assert int(counts[layer].argmax()) == model.hot_expert(layer, 1)


def test_config_requires_a_file_for_learned(tmp_path):
    with pytest.raises(ReplicationConfigError, match="moe_replication.learned_path"):
        ReplicationConfig.parse({"predictor": "learned"})
    with pytest.raises(FileNotFoundError, match="learned_path"):
        RouterDistiller.load(str(tmp_path / "missing.pt"))
