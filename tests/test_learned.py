"""The learned predictor: record router outputs, distil, save, load, predict (one process)."""

import pytest
import torch

from ds_moe_replicate import ReplicationConfig, ReplicationConfigError
from ds_moe_replicate.learned import (
    RouterDistiller,
    RouterRecord,
    agreement_on,
    held_out_documents,
    record_router_outputs,
    train_distiller,
)
from ds_moe_replicate.tiny_switch import TinySwitchConfig, build_tiny_switch, topic_tokens


def test_distil_save_load_and_predict(tmp_path):
    cfg = TinySwitchConfig(hidden=32, ffn=64, blocks=4, num_experts=4, vocab=256, topic_tokens=32)
    model = build_tiny_switch(cfg, ep_size=1, set_groups=False)
    batches = [topic_tokens(cfg, 2, 64, 0.7, seed=i, topic=i % 2) for i in range(6)]
    record = record_router_outputs(model, model.embed, model.moe_layers(), batches)
    assert record.emb_NH.shape == (6 * 128, 32) and record.experts_NLK.shape == (6 * 128, 2, 1)
    # Every sequence is a document; tokens are the batches' ids.
    assert record.doc_N.unique().tolist() == list(range(12)) and record.token_N.equal(torch.cat(batches).reshape(-1))
    distiller, held = train_distiller(record, 4, epochs=40)
    assert held.held_out_documents == 1 and held.train_documents == 11 and held.held_out_tokens == 64
    assert len(held.agreement_L) == 2 and min(held.agreement_L) > 0.8  # a sequence it never saw
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


def test_held_out_split_is_by_document_and_unseen_tokens_are_counted():
    doc_N = torch.arange(30).repeat_interleave(5)
    held = held_out_documents(doc_N)
    assert held.sum() == 3 * 5 and set(doc_N[held].tolist()) == {9, 19, 29}
    assert not set(doc_N[held].tolist()) & set(doc_N[~held].tolist())  # no document on both sides
    # A record where layer 0 routes by token id (expert = id % 4), and a distiller that follows
    # it only for the ids it was trained on: unseen ids are where memorisation cannot help.
    token_N = torch.arange(150) % 40
    token_N[held] = torch.tensor([1, 2, 3, 100, 101] * 3)  # ids 100, 101 occur only in held-out docs
    emb_NH = torch.nn.functional.one_hot(token_N, 128).float()
    experts_NLK = (token_N % 4).view(-1, 1, 1)
    record = RouterRecord(emb_NH, experts_NLK, token_N, doc_N)
    model, report = train_distiller(record, 4, epochs=60, width=64)
    assert report.held_out_tokens == 15 and report.unseen_tokens == 6
    assert report.train_documents == 27 and report.held_out_documents == 3
    assert report.agreement_L[0] >= 9 / 15  # the 9 seen tokens are learned
    # An unseen id's one-hot row never got a gradient: the figure is over those 6 tokens alone.
    again = agreement_on(model, record, held)
    assert again.unseen_agreement_L == report.unseen_agreement_L
    hits = (model(emb_NH[held]).argmax(-1)[:, 0] == experts_NLK[held, 0, 0])
    unseen = torch.isin(token_N[held], torch.tensor([100, 101]))
    assert report.unseen_agreement_L[0] == pytest.approx(float(hits[unseen].float().mean()))
