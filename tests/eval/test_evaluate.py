"""Retrieval and zero-shot metrics on hand-made features with known answers, and `evaluate` across
2 real gloo ranks giving what 1 rank gives (with uneven batches per rank and a forward that is a
collective, as under ZeRO-3)."""

from __future__ import annotations

import json
import re
import zlib
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.eval.evaluate import (
    evaluate,
    expected_hits,
    format_table,
    read_classes,
    retrieval_metrics,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from tests.distributed_helpers import run_ranks

# --------------------------------------------------------------------------- retrieval

def test_retrieval_known_ranks():
    # scores S = M @ T.T with M = I and T = S.T: media i's partner has exactly i candidates above it,
    # and text j's partner has exactly N-1-j above it
    n = 12
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    scores = torch.where(j < i, 2.0, torch.where(j == i, 1.0, 0.0))
    metrics = retrieval_metrics(torch.eye(n), scores.T.contiguous())
    for k in (1, 5, 10):
        assert metrics[f"media_to_text_R@{k}"] == pytest.approx(k / n)
        assert metrics[f"text_to_media_R@{k}"] == pytest.approx(k / n)
        assert metrics[f"chance_R@{k}"] == pytest.approx(k / n)


def test_retrieval_perfect_and_chance_levels():
    features = torch.eye(3)
    metrics = retrieval_metrics(features, features)
    assert all(metrics[f"{d}_R@{k}"] == 1.0 for d in ("media_to_text", "text_to_media") for k in (1, 5, 10))
    # fewer candidates than k: the chance level is 1, not k/N
    assert metrics["chance_R@1"] == pytest.approx(1 / 3) and metrics["chance_R@5"] == 1.0


def test_retrieval_ties_score_the_expected_rank():
    # constant features: everything ties, every query scores exactly the chance level
    constant = F.normalize(torch.ones(20, 4), dim=-1)
    metrics = retrieval_metrics(constant, constant)
    for k in (1, 5, 10):
        assert metrics[f"media_to_text_R@{k}"] == pytest.approx(k / 20)
        assert metrics[f"text_to_media_R@{k}"] == pytest.approx(k / 20)
    # partner tied with 2 others, 1 candidate strictly above: P(top-1) = 0, P(top-2) = 1/3, P(top-3) = 2/3
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]])
    hits = expected_hits(scores, torch.tensor([0]), (1, 2, 3, 4))
    assert [hits[k].item() for k in (1, 2, 3, 4)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    # identical captions: two media, two equal texts -> each media's partner ties with the other text
    media = torch.eye(2)
    text = F.normalize(torch.ones(2, 2), dim=-1)
    metrics = retrieval_metrics(media, text)
    assert metrics["media_to_text_R@1"] == pytest.approx(0.5)
    assert metrics["text_to_media_R@1"] == pytest.approx(0.5)


def test_retrieval_is_order_invariant():
    generator = torch.Generator().manual_seed(0)
    media = F.normalize(torch.randn(300, 16, generator=generator), dim=-1)
    text = F.normalize(media + 0.8 * torch.randn(300, 16, generator=generator), dim=-1)
    text[10] = text[11]  # a duplicate caption
    permutation = torch.randperm(300, generator=generator)
    assert retrieval_metrics(media, text) == pytest.approx(retrieval_metrics(media[permutation], text[permutation]))


def test_retrieval_rejects_unpaired_features():
    with pytest.raises(ValueError, match="paired"):
        retrieval_metrics(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(torch.zeros(0, 4), torch.zeros(0, 4))


# --------------------------------------------------------------------------- zero-shot

VOCAB = {"red": 0, "blue": 1, "green": 2}


def word_tokenizer(texts: list[str], context: int = 8) -> torch.Tensor:
    """Class words get their own id; every other word maps to a shared 'filler' id 3; 4 pads."""
    rows = []
    for text in texts:
        ids = [VOCAB.get(word, 3) for word in re.findall(r"[a-z]+", text.lower())][:context]
        rows.append(ids + [4] * (context - len(ids)))
    return torch.tensor(rows)


class KeywordTextModel(nn.Module):
    """encode_text = sum of word vectors: class words on axes 0-2, filler words 0.5 on axis 3."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(5, 4)
        table[0, 0] = table[1, 1] = table[2, 2] = 1.0
        table[3, 3] = 0.5
        self.words = nn.Embedding.from_pretrained(table)

    def encode_text(self, tokens):
        return {"text_features": self.words(tokens).sum(dim=1)}


def test_zero_shot_prompt_ensembling_and_accuracy():
    model = KeywordTextModel()
    templates = ["a {}.", "a photo of a {}."]
    classifier = zero_shot_classifier(model, word_tokenizer, ["red", "blue", "green"], templates, "cpu")
    assert classifier.shape == (4, 3)
    # by hand for "red": "a red." = e0 + 0.5 e3, "a photo of a red." = e0 + 2 e3 (four filler words)
    short = F.normalize(torch.tensor([1.0, 0, 0, 0.5]), dim=0)
    long = F.normalize(torch.tensor([1.0, 0, 0, 2.0]), dim=0)
    assert torch.allclose(classifier[:, 0], F.normalize((short + long) / 2, dim=0))
    assert torch.allclose(classifier.norm(dim=0), torch.ones(3))

    eye = torch.eye(4)
    # a red, a blue, a green, a blue labelled red (wrong), an unlabelled one, and one equidistant (axis 3)
    media = torch.stack([eye[0], eye[1], eye[2], eye[1], eye[0], eye[3]])
    labels = torch.tensor([0, 1, 2, 0, -1, 2])
    metrics = zero_shot_accuracy(media, labels, classifier)
    # the equidistant sample ties with all 3 classes: 1/3 of a hit at top-1
    assert metrics["zero_shot_top1"] == pytest.approx((3 + 1 / 3) / 5)
    assert metrics["zero_shot_top5"] == 1.0
    assert metrics["chance_zero_shot_top1"] == pytest.approx(1 / 3)
    assert metrics["chance_zero_shot_top5"] == 1.0
    assert metrics["zero_shot_samples"] == 5.0

    with pytest.raises(ValueError, match="outside the 3 classes"):
        zero_shot_accuracy(media, torch.tensor([0, 1, 2, 3, 0, 0]), classifier)
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        zero_shot_classifier(model, word_tokenizer, ["red"], ["a photo"], "cpu")


# --------------------------------------------------------------------------- evaluate, 1 and 2 ranks

class Batch(NamedTuple):  # the loader's Batch contract (docs/ARCHITECTURE.md)
    media: torch.Tensor
    tokens: torch.Tensor
    keys: list[str]
    labels: torch.Tensor


CLASSES = {"classes": ["red", "blue", "green"], "templates": ["a {}.", "a photo of a {}."]}
SAMPLES = 37  # odd: the two ranks get different numbers of batches


def hashed_tokenizer(texts: list[str], context: int = 6) -> torch.Tensor:
    rows = []
    for text in texts:
        ids = [zlib.crc32(word.encode()) % 63 + 1 for word in re.findall(r"[a-z]+", text.lower())][:context]
        rows.append(ids + [0] * (context - len(ids)))
    return torch.tensor(rows)


class StandInModel(nn.Module):
    """Two tiny towers. With `collective`, every encode call all-reduces, like a ZeRO-3 forward
    gathering its parameters: a rank that skipped a forward would hang the others."""

    def __init__(self, collective: bool = False):
        super().__init__()
        torch.manual_seed(0)  # same weights on every rank
        self.media_tower = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 8), nn.Dropout(0.5))
        self.text_tower = nn.EmbeddingBag(64, 8, mode="sum", padding_idx=0)
        self.collective = collective
        self.forwards = 0

    def _sync(self):
        if self.collective:
            dist.all_reduce(torch.zeros(1))

    def encode_media(self, media):
        self._sync()
        self.forwards += 1
        return {"media_features": F.normalize(self.media_tower(media), dim=-1)}

    def encode_text(self, tokens):
        self._sync()
        return {"text_features": F.normalize(self.text_tower(tokens), dim=-1)}


def make_samples() -> list[tuple]:
    generator = torch.Generator().manual_seed(1)
    colours = CLASSES["classes"]
    samples = []
    for index in range(SAMPLES):
        label = index % 3
        media = torch.randn(2, 3, 3, generator=generator) + label
        caption = f"a {colours[label]} thing number {index % 5}"
        samples.append((f"{index:06d}", media, caption, -1 if index % 7 == 0 else label))
    return samples


def rank_batches(rank: int, world_size: int, batch_size: int = 4) -> list[Batch]:
    # contiguous halves, as whole shards per rank would give: 19 + 18 samples -> 5 and 5 batches,
    # with batch_size 3 -> 7 and 6: uneven
    samples = make_samples()
    share = samples[rank * (SAMPLES + 1) // world_size:(rank + 1) * (SAMPLES + 1) // world_size]
    batches = []
    for start in range(0, len(share), batch_size):
        chunk = share[start:start + batch_size]
        batches.append(Batch(torch.stack([s[1] for s in chunk]), hashed_tokenizer([s[2] for s in chunk]),
                             [s[0] for s in chunk], torch.tensor([s[3] for s in chunk])))
    return batches


def evaluate_on_rank(rank: int, world_size: int, batch_size: int) -> tuple[dict, int, bool]:
    model = StandInModel(collective=world_size > 1)
    model.train()
    metrics = evaluate(model, rank_batches(rank, world_size, batch_size), tokenizer=hashed_tokenizer,
                       classes_json=CLASSES, device="cpu", rank=rank, world_size=world_size)
    return metrics, model.forwards, model.training


def test_evaluate_single_process():
    metrics, forwards, training = evaluate_on_rank(0, 1, 4)
    assert training, "evaluate must restore training mode"
    assert forwards == 10
    assert metrics["samples"] == SAMPLES and metrics["zero_shot_samples"] == SAMPLES - 6
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["chance_R@1"] == pytest.approx(1 / SAMPLES)
    # the same figures as encoding all samples in one batch by hand, in eval mode (dropout off)
    model = StandInModel().eval()
    (everything,) = rank_batches(0, 1, batch_size=SAMPLES)
    with torch.no_grad():
        media = model.encode_media(everything.media)["media_features"]
        text = model.encode_text(everything.tokens)["text_features"]
        classifier = zero_shot_classifier(model, hashed_tokenizer, CLASSES["classes"], CLASSES["templates"], "cpu")
    expected = retrieval_metrics(media, text) | zero_shot_accuracy(media, everything.labels, classifier)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < metrics["media_to_text_R@1"] < 1 and 0 < metrics["zero_shot_top1"] < 1  # not a degenerate case
    table = format_table(metrics)
    assert "media->text R@1" in table and "zero-shot top-1" in table and f"{100 / SAMPLES:.2f}%" in table


def test_evaluate_refuses_world_size_without_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        evaluate(StandInModel(), [], tokenizer=hashed_tokenizer, classes_json=None, device="cpu", world_size=2)


def test_evaluate_empty_loader_names_the_problem():
    with pytest.raises(ValueError, match="no samples"):
        evaluate(StandInModel(), [], tokenizer=hashed_tokenizer, classes_json=None, device="cpu")


# --------------------------------------------------------------------------- classes.json

def test_read_classes_local(tmp_path):
    dataset = tmp_path / "shapes" / "val"
    dataset.mkdir(parents=True)
    assert read_classes(str(dataset)) is None
    (dataset / "classes.json").write_text(json.dumps(CLASSES))
    assert read_classes(str(dataset)) == CLASSES
    assert read_classes(f"{dataset}/shapes-val-{{000000..000003}}.tar") == CLASSES
    assert read_classes(f"file://{dataset}/sizes.json") == CLASSES
    (dataset / "classes.json").write_text(json.dumps({"classes": ["red"], "templates": ["a photo"]}))
    with pytest.raises(ValueError, match="classes.json: 'templates'"):
        read_classes(str(dataset))
    (dataset / "classes.json").write_text("{not json")
    with pytest.raises(ValueError, match="classes.json is not valid JSON"):
        read_classes(str(dataset))


# --------------------------------------------------------------------------- real shards, real towers

@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory):
    """40 held-out shapes samples in 3 shards (16 + 16 + 8), with sizes.json and classes.json."""
    from pipeline.shards.build import build_shards
    from pipeline.shards.config import BuildConfig

    output = tmp_path_factory.mktemp("shapes-val")
    build_shards(BuildConfig(source="shapes", output=str(output), split="val", count=40, samples_per_shard=16),
                 progress=False)
    return output


@pytest.fixture(scope="module")
def tiny_clip_weights(tmp_path_factory):
    """A random tiny-clip's ContrastiveModel state dict and its open_clip export, saved once."""
    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny-clip"))
    directory = tmp_path_factory.mktemp("tiny-clip")
    torch.save(model.state_dict(), directory / "model.pt")
    torch.save(model.open_clip_state_dict(), directory / "open_clip.pt")
    return directory


def evaluate_shards_on_rank(rank: int, world_size: int, shards: str, weights: str) -> tuple[dict, bool]:
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader
    from pipeline.model.build import build_model, get_tokenizer, image_size, media_transform
    from pipeline.model.config import ModelConfig

    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    model_cfg = ModelConfig(name="tiny-clip")
    model = build_model(model_cfg)
    model.load_state_dict(torch.load(weights, weights_only=True))
    tokenizer = get_tokenizer(model_cfg)
    loader = build_loader(DataConfig(batch_size=12, workers=0), shards, rank=rank, world_size=world_size, seed=0,
                          media_transform=media_transform(model_cfg, is_train=False), tokenizer=tokenizer,
                          train=False, image_size=image_size(model_cfg))
    metrics = evaluate(model, loader, tokenizer=tokenizer, classes_json=read_classes(shards), device="cpu",
                       rank=rank, world_size=world_size, progress=False)
    return metrics, model.training


def evaluate_both_on_rank(rank: int, world_size: int, shards: str, weights: str) -> tuple:
    # one spawn of 2 processes for both checks: starting ranks (importing open_clip) is the slow part
    return evaluate_on_rank(rank, world_size, 3), evaluate_shards_on_rank(rank, world_size, shards, weights)


@pytest.mark.slow
def test_evaluate_two_ranks_equals_one(shapes_val, tiny_clip_weights):
    weights = str(tiny_clip_weights / "model.pt")
    stand_in_single, _, _ = evaluate_on_rank(0, 1, 3)
    shards_single, training = evaluate_shards_on_rank(0, 1, str(shapes_val), weights)
    assert training
    # every sample once: 40, not the 48 slots of 2 ranks x 2 padded batches of 12
    assert shards_single["samples"] == 40 and shards_single["zero_shot_samples"] == 40
    assert shards_single["chance_zero_shot_top1"] == pytest.approx(1 / 12)
    assert shards_single["chance_R@10"] == pytest.approx(10 / 40)

    results = run_ranks(evaluate_both_on_rank, 2, str(shapes_val), weights, timeout=240)
    (stand_in_0, forwards_0, _), (stand_in_1, forwards_1, _) = (stand_in for stand_in, _ in results)
    # stand-in: rank 0 has 7 batches, rank 1 has 6; rank 1 ran one stand-in forward to keep the
    # collective forward in step, as ZeRO-3 needs (a missing forward would hang rank 0 until the timeout)
    assert forwards_0 == forwards_1 == 7
    for single, (metrics_0, metrics_1) in ((stand_in_single, (stand_in_0, stand_in_1)),
                                           (shards_single, tuple(shards for _, (shards, _) in results))):
        for metrics in (metrics_0, metrics_1):
            assert metrics.keys() == single.keys()
            for key, value in single.items():
                assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_read_classes_of_built_shards(shapes_val):
    from pipeline.shards.synthetic import SHAPE_CLASSES

    classes = read_classes(str(shapes_val))
    assert classes["classes"] == SHAPE_CLASSES and all("{}" in t for t in classes["templates"])
    assert read_classes(f"{shapes_val}/shapes-val-{{000000..000002}}.tar::{shapes_val}") == classes


def test_eval_command_on_exported_weights(shapes_val, tiny_clip_weights, tmp_path, capsys):
    from pipeline.cli import main

    config = tmp_path / "config.yaml"
    config.write_text("model:\n  name: tiny-clip\ndata:\n  workers: 0\neval:\n  batch_size: 16\n")
    report = tmp_path / "out" / "eval.json"
    code = main(["eval", str(tiny_clip_weights / "open_clip.pt"), "--config", str(config), "--data", str(shapes_val),
                 "--json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "(12 classes)" in printed and "zero-shot top-1" in printed and "40 samples, 40 labelled" in printed
    assert "  2.50%" in printed  # chance R@1 = 1/40 beside the R@1 figures
    written = json.loads(report.read_text())
    assert written["metrics"]["samples"] == 40
    # the exported weights evaluate exactly like the model they came from
    direct, _ = evaluate_shards_on_rank(0, 1, str(shapes_val), str(tiny_clip_weights / "model.pt"))
    for key, value in direct.items():
        assert written["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_eval_command_names_a_missing_config(tiny_clip_weights, tmp_path, capsys):
    from pipeline.cli import main

    lone = tmp_path / "weights.pt"
    lone.write_bytes((tiny_clip_weights / "open_clip.pt").read_bytes())
    # a bad setting ends the command with exit code 2 and one line naming it, no traceback
    assert main(["eval", str(lone), "--data", "unused"]) == 2
    assert "needs --config" in capsys.readouterr().err


def test_eval_command_without_held_out_data_says_so(tiny_clip_weights, tmp_path, capsys):
    from pipeline.cli import main

    config = tmp_path / "config.yaml"
    config.write_text("model:\n  name: tiny-clip\n")  # no data.val_urls, and no --data
    assert main(["eval", str(tiny_clip_weights / "open_clip.pt"), "--config", str(config)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert lines == ["error: no held-out data: pass --data URL (the run's config has no data.val_urls)"]


@pytest.fixture()
def s3_endpoint():
    """A real moto S3 server on loopback, for the duration of one test."""
    from moto.server import ThreadedMotoServer

    from tests.distributed_helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_read_classes_from_s3(s3_endpoint):
    import fsspec

    options = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
               "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "eu-west-1"}}
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir("eval-bucket")
    assert read_classes("s3://eval-bucket/shapes/val", options) is None
    fs.pipe("eval-bucket/shapes/val/classes.json", json.dumps(CLASSES).encode())
    assert read_classes("s3://eval-bucket/shapes/val/shapes-val-{000000..000001}.tar", options) == CLASSES
    assert read_classes("s3://eval-bucket/shapes/val/", options) == CLASSES


def test_eval_command_says_why_zero_shot_did_not_run(shapes_val, tiny_clip_weights, tmp_path, capsys):
    import shutil

    from pipeline.cli import main

    config = tmp_path / "config.yaml"
    config.write_text("model:\n  name: tiny-clip\ndata:\n  workers: 0\neval:\n  batch_size: 16\n")
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(shapes_val, unlabelled)
    (unlabelled / "classes.json").unlink()
    weights = str(tiny_clip_weights / "open_clip.pt")
    assert main(["eval", weights, "--config", str(config), "--data", str(unlabelled), "--max-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot: not run, the held-out set has no classes.json" in printed and "zero-shot top-1" not in printed
    assert main(["eval", weights, "--config", str(config), "--data", str(shapes_val), "--max-batches", "1",
                 "--no-zero-shot"]) == 0
    assert "zero-shot: not run, --no-zero-shot" in capsys.readouterr().out
    assert main(["eval", weights, "--config", str(config), "--data", str(shapes_val), "--max-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot top-1" in printed and "zero-shot: not run" not in printed
