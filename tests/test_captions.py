"""Captions: the trigger kept first, augmentation, token counts, and `sdlora caption`."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from sdlora.captions import (
    augment_caption,
    caption_with_trigger,
    clip_token_count,
    normalise_caption,
    template_caption,
)
from sdlora.cli import main


def test_trigger_is_put_first_or_moved_first():
    assert caption_with_trigger("a cat, forest", "zk") == "zk, a cat, forest"
    assert caption_with_trigger("a cat, ZK, forest", "zk") == "ZK, a cat, forest"
    assert caption_with_trigger("zk style painting of a cat", "zk") == "zk style painting of a cat"
    assert caption_with_trigger("", "zk") == "zk"
    assert (
        caption_with_trigger("zk style painting, a cat", "zk style") == "zk style painting, a cat"
    )
    assert caption_with_trigger("a zkx cat", "zk") == "zk, a zkx cat"


def test_multi_line_bom_and_crlf_rule():
    assert normalise_caption("\ufeffa cat\r\n\r\n  forest ,\rnight\n") == "a cat, forest, night"
    assert normalise_caption("a   cat\tsitting") == "a cat sitting"


def test_shuffle_keeps_the_trigger_first_and_dropout_drops():
    caption = "zk, a, b, c, d, e, f"
    rng = random.Random(0)
    variants = {augment_caption(caption, rng, keep_tokens=1, shuffle=True) for _ in range(50)}
    assert len(variants) > 10
    assert all(v.startswith("zk, ") and sorted(v.split(", ")) == sorted(caption.split(", "))
               for v in variants)  # fmt: skip
    dropped = [augment_caption(caption, rng, tag_dropout=0.5) for _ in range(50)]
    assert all(d.startswith("zk") for d in dropped)
    assert 2 < sum(len(d.split(", ")) for d in dropped) / 50 < 6
    empty = [augment_caption(caption, rng, caption_dropout=0.3) for _ in range(200)]
    assert 30 < empty.count("") < 90
    assert augment_caption(caption, rng) == caption


def test_clip_token_count():
    assert clip_token_count("zk, a cat") == 7  # bos, z, k, ",", a, cat, eos: "zk" is rare
    assert clip_token_count(", ".join(["word"] * 40)) == 81


def test_template_fields_and_bad_template():
    assert template_caption("{trigger}, {name}", "zk", name="red_barn-2") == "zk, red barn 2"
    with pytest.raises(ValueError, match="may use"):
        template_caption("{trigger} {oops}", "zk")


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("one.png", "two.jpg", "a.jpg", "a.png"):
        Image.new("RGB", (32, 32), (len(name) * 20, 0, 0)).save(folder / name)
    (folder / "two.txt").write_text("my own caption")
    (folder / "broken.png").write_bytes(b"nope")
    return folder


def _texts(folder):
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.suffix == ".txt"}


def test_caption_command_writes_only_missing_sidecars(images, capsys):
    assert main(["caption", str(images), "--trigger", "zk", "--template", "{trigger}, {name}"]) == 0
    out = capsys.readouterr().out
    assert "broken.png" in out and "3 caption(s) written" in out
    assert _texts(images) == {
        "a.jpg.txt": "zk, a\n",
        "a.png.txt": "zk, a\n",
        "one.txt": "zk, one\n",
        "two.txt": "my own caption",
    }
    assert main(["caption", str(images), "--trigger", "zk"]) == 0
    assert "0 caption(s) written, kept 4" in capsys.readouterr().out
    assert main(["caption", str(images), "--trigger", "zk", "--overwrite"]) == 0
    assert _texts(images)["two.txt"] == "zk\n"


def test_blip_without_a_model_says_what_to_pass(images, capsys):
    assert main(["caption", str(images), "--trigger", "zk", "--captioner", "blip"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "Salesforce/blip-image-captioning-base" in err
    missing = str(images / "no-model")
    assert main(["caption", str(images), "--trigger", "zk", "--captioner", "blip",
                 "--model", missing]) == 2  # fmt: skip
    assert "cannot load a BLIP model" in capsys.readouterr().err


def _tiny_blip(folder):
    """A random BLIP captioner with a 40-word vocabulary, built offline."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    words += ["a", "photo", "of", "cat", "red", "hill"]
    (folder / "vocab.txt").write_text("\n".join(words))
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), model_max_length=32)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        vision_config=dict(**small, image_size=32, patch_size=8),
        text_config=dict(**small, vocab_size=len(words), max_position_embeddings=64,
                         encoder_hidden_size=32, bos_token_id=2, sep_token_id=3, pad_token_id=0),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_blip_captioner_writes_trigger_first(images, tmp_path, capsys):
    model = _tiny_blip(tmp_path / "blip")
    code = main(["caption", str(images), "--trigger", "zk", "--captioner", "blip",
                 "--model", str(model)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    texts = _texts(images)
    assert texts["two.txt"] == "my own caption"
    for name in ("one.txt", "a.jpg.txt", "a.png.txt"):
        assert texts[name].startswith("zk, ") and len(texts[name]) > len("zk, \n")


def test_a_caption_that_cannot_be_written_is_reported_and_the_rest_written(
    images, capsys, monkeypatch
):
    import sdlora.autocaption as autocaption

    real_write = autocaption.write_atomic

    def write(path, data):  # what a read-only file system does (tests run as root)
        if path.name == "one.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_write(path, data)

    monkeypatch.setattr(autocaption, "write_atomic", write)
    assert main(["caption", str(images), "--trigger", "zk"]) == 0
    out = capsys.readouterr().out
    assert "cannot write one.txt: Permission denied" in out and "2 caption(s) written" in out
    assert "one.txt" not in _texts(images) and "a.png.txt" in _texts(images)
