"""The demo world: renderer, captions, tokenizer, and the shipped pipeline and classifiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sepme_adapter import demo
from sepme_adapter.testing.tokenizer import write_word_tokenizer


def test_the_renderer_is_deterministic_for_a_seed():
    first = demo.render("circle", "orvan", np.random.default_rng(3))
    again = demo.render("circle", "orvan", np.random.default_rng(3))
    other = demo.render("circle", "orvan", np.random.default_rng(4))
    assert isinstance(first, Image.Image) and first.size == (32, 32) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


@pytest.mark.parametrize("style", [None, *demo.STYLES])
def test_every_object_renders_in_every_style(style):
    for obj in demo.OBJECTS:
        array = demo.render_array(obj, style, np.random.default_rng(0))
        assert array.shape == (32, 32, 3) and array.dtype == np.float32
        assert 0.0 <= array.min() and array.max() <= 1.0


def test_caption_batches_hold_images_captions_and_labels():
    batch = demo.sample_caption_batch(16, np.random.default_rng(0))
    assert batch.images.shape == (16, 3, 32, 32) and batch.images.dtype == torch.float32
    assert len(batch.captions) == len(batch.objects) == len(batch.styles) == 16
    assert set(batch.objects) <= set(demo.OBJECTS) and set(batch.styles) <= {*demo.STYLES, demo.PLAIN}
    assert all(word in demo.VOCABULARY for caption in batch.captions for word in caption.split())
    dropped = demo.sample_caption_batch(4, np.random.default_rng(0), caption_dropout=1.0)
    assert dropped.captions == [""] * 4


def test_every_concept_has_a_family_a_prompt_and_paraphrases_in_the_vocabulary():
    assert set(demo.CONCEPTS) == {*demo.OBJECTS, *demo.STYLES}
    for name, concept in demo.CONCEPTS.items():
        assert concept.family in demo.LABELS and name in demo.LABELS[concept.family]
        prompts = (concept.prompt, *concept.paraphrases)
        assert len(concept.paraphrases) >= 2 and len(set(prompts)) == len(prompts)
        assert all(name in p.split() and set(p.split()) <= set(demo.VOCABULARY) for p in prompts)


def test_the_tokenizer_maps_every_caption_word_to_one_token(tmp_path):
    written = write_word_tokenizer(tmp_path, demo.VOCABULARY, model_max_length=10)
    shipped = demo.load_pipeline().tokenizer
    for tokenizer in (written, shipped):
        ids = [tokenizer(word, add_special_tokens=False).input_ids for word in demo.VOCABULARY]
        assert all(len(i) == 1 for i in ids)
        assert len({i[0] for i in ids}) == len(demo.VOCABULARY)
        assert tokenizer.model_max_length == 10


def test_the_shipped_pipeline_loads_and_generates_32x32_images():
    pipe = demo.load_pipeline()
    assert pipe.text_encoder.config.hidden_size == 96
    assert pipe.unet.config.cross_attention_dim == 96
    assert sum(name.endswith("attn2") for name, _ in pipe.unet.named_modules()) >= 4
    assert pipe.safety_checker is None
    generator = torch.Generator().manual_seed(0)
    images = pipe("a circle", num_inference_steps=2, generator=generator, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()


def test_the_shipped_sdxl_world_is_an_sdxl_pipeline_with_a_pooled_path():
    pipe = demo.load_pipeline("sdxl")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.config.force_zeros_for_empty_prompt
    widths = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == sum(widths) == 96  # both encoders side by side
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.add_embedding.linear_1.in_features == pipe.text_encoder_2.config.projection_dim + 6 * 8
    generator = torch.Generator().manual_seed(0)
    images = pipe("a circle", num_inference_steps=2, generator=generator, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="demo worlds"):
        demo.pipeline_path("sd3")


def test_the_classifiers_recognise_fresh_renders():
    classifiers = demo.load_classifiers()
    rng = np.random.default_rng(12345)
    objects = [str(o) for o in rng.choice(list(demo.OBJECTS), size=50)]
    styles = [str(s) for s in rng.choice([*demo.STYLES, demo.PLAIN], size=50)]
    images = [demo.render(o, s, rng) for o, s in zip(objects, styles)]
    assert classifiers["object"].labels == list(demo.LABELS["object"])
    for family, truth in (("object", objects), ("style", styles)):
        predictions = classifiers[family].predict(images)
        assert np.mean([p == t for p, t in zip(predictions, truth)]) >= 0.95
    tensor_predictions = classifiers["style"].predict(
        torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) / 255.0 for im in images])
    )
    assert tensor_predictions == classifiers["style"].predict(images)
