"""nodes/clip_classifier.py, the zero-shot CLIP classifier (Radford et al., ICML 2021) made from a CLIP_VISION and a
CLIP: its logits equal s · cos(image embedding, text embedding) computed in float64 from ComfyUI's own encoders, its
log-probability gradient can be taken inside ComfyUI's inference mode and matches finite differences, it owns float32
copies of the vision weights, and it refuses, naming the node, what cannot be a CLIP zero-shot classifier.

The models are slim and random, built from ComfyUI's own classes under torch.inference_mode as its loader nodes run:
a `ClipVisionModel` from a tiny json config in the format of comfy/clip_vision_config_vitl.json, and the text
encoders of ComfyUI's SD1.5, SD2.x and SDXL model configs (`clip_target`) at slim widths and depths.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import comfy.clip_vision
import comfy.sd
import comfy.supported_models
import slim_models
from comfyui_guidance.guiders.classifier import ClassifierOnDenoised
from comfyui_guidance.nodes.classifier import ClassifierTargetClasses
from comfyui_guidance.nodes.clip_classifier import (DISPLAY_NAME, NODE_ID, CLIPVisionZeroShotClassifier, clip_pixels,
                                                    clip_vision_classifier, owned_copy, parse_class_prompts)

WIDTH = 48  # the slim text encoders' width, hence their projected embeddings', and the vision projection's
SIZE = 32
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]  # not CLIP's: a classifier that ignores the model's values fails
VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
          "image_size": SIZE, "intermediate_size": 64, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
          "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8,
          "projection_dim": WIDTH, "image_mean": MEAN, "image_std": STD, "torch_dtype": "float32"}
# SD2.x's and SDXL's encoders read their penultimate layer, so they need at least 3 layers
TEXT = {"hidden_size": WIDTH, "intermediate_size": 96, "num_attention_heads": 2, "num_hidden_layers": 3}
PROMPTS = "cat: a photo of a cat\ndog: a photo of a dog\nbird: a photo of a bird"


def slim_clip_vision(tmp_path_factory, config, seed=0):
    path = tmp_path_factory.mktemp("clip_vision") / "config.json"
    path.write_text(json.dumps(config))
    with torch.inference_mode():
        clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
        slim_models.randomize_(clip_vision.model, seed)
    return clip_vision


def slim_clip(family, seed=1, **configs):
    """The CLIP (text encoder and tokenizer) of a ComfyUI model config, slimmed by ComfyUI's per-encoder config
    overrides (`<encoder>_model_config`)."""
    with torch.inference_mode():
        clip = comfy.sd.CLIP(family({}).clip_target(),
                             model_options={f"{name}_model_config": config for name, config in configs.items()})
        slim_models.randomize_(clip.cond_stage_model, seed)
    return clip


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    return slim_clip_vision(tmp_path_factory, VISION)


@pytest.fixture(scope="module")
def sd2_clip():
    return slim_clip(comfy.supported_models.SD20, clip_h=TEXT)


def build(clip_vision, clip, prompts=PROMPTS, logit_scale=100.0):
    """The node's classifier, made as ComfyUI runs a node: under inference mode."""
    with torch.inference_mode():
        return CLIPVisionZeroShotClassifier.execute(clip_vision, clip, prompts, logit_scale).result[0]


def images(shape, seed):
    """Random 8-bit images (multiples of 1/255) [N, 3, H, W], which ComfyUI's rounding to 8 bits leaves unchanged."""
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)) / 255


def test_logits_equal_float64_reference(clip_vision, sd2_clip):
    """logits = s · cos(f(x), P g(t_k)) in float64, with f(x) ComfyUI's `encode_image` of the same images and
    P g(t_k) the text projection applied, here, to ComfyUI's unprojected pooled output of each prompt."""
    scale = 37.5
    classifier = build(clip_vision, sd2_clip, logit_scale=scale)
    x = images((5, 3, SIZE, SIZE), seed=2)
    with torch.inference_mode():
        logits = classifier.network(x)
        image_embeds = clip_vision.encode_image(x.movedim(1, -1)).image_embeds.double()
        pooled = torch.cat([sd2_clip.encode_from_tokens(sd2_clip.tokenize(prompt), return_pooled="unprojected")[1]
                            for prompt in ("a photo of a cat", "a photo of a dog", "a photo of a bird")]).double()
    projection = sd2_clip.cond_stage_model.clip_h.transformer.text_projection.weight.double()
    want = scale * F.cosine_similarity(image_embeds[:, None], (pooled @ projection.T)[None], dim=-1)
    assert classifier.class_names == ("cat", "dog", "bird")
    assert classifier.input_shape == (3, SIZE, SIZE) and classifier.space == "image"
    assert logits.dtype == torch.float32 and logits.shape == (5, 3)
    assert (want.max(1).values - want.min(1).values).min() > 0.1  # the classes are told apart: the check has teeth
    torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("height, width", [(40, 56), (56, 40), (SIZE, SIZE)])
def test_preprocessing_is_comfyui_clip_preprocess_without_rounding(height, width):
    """Resize of the short side, centre crop and normalisation as ComfyUI's clip_preprocess (crop=True): equal up to
    its rounding to 8 bits (half a level, over the std)."""
    x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(3))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    mine = clip_pixels(x, SIZE, mean, std)
    theirs = comfy.clip_vision.clip_preprocess(x.movedim(1, -1), size=SIZE, mean=MEAN, std=STD, crop=True)
    assert mine.shape == theirs.shape == (2, 3, SIZE, SIZE)
    assert (mine - theirs).abs().max() <= 0.5 / 255 / min(STD) + 1e-6


@pytest.mark.parametrize("height, width", [(SIZE, SIZE), (40, 48)])
def test_gradient_under_inference_mode_matches_finite_differences(clip_vision, sd2_clip, height, width):
    """Built and run under inference mode as in a prompt, the gradient of log p(y | x) is taken with
    inference_mode(False) + enable_grad (as EluCD does); it equals that of a float64 copy of the network, whose
    gradient matches central differences along random directions; at the model's size and through the resize."""
    classifier = build(clip_vision, sd2_clip)
    target = torch.tensor([0, 2])
    with torch.inference_mode():
        x = 0.1 + 0.8 * torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(4))
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x.clone().requires_grad_(True)
            log_p = torch.log_softmax(classifier.network(leaf), dim=1)[[0, 1], target].sum()
            (grad,) = torch.autograd.grad(log_p, leaf)
    network64 = copy.deepcopy(classifier.network).double()

    def f(z):
        return torch.log_softmax(network64(z), dim=1)[[0, 1], target].sum()

    leaf64 = x.clone().double().requires_grad_(True)
    (grad64,) = torch.autograd.grad(f(leaf64), leaf64)
    assert torch.linalg.vector_norm(grad64) > 1e-2  # not a vanishing gradient, which any network would match
    assert torch.linalg.vector_norm(grad - grad64) <= 1e-4 * torch.linalg.vector_norm(grad64)
    h = 1e-5
    for seed in range(3):
        v = torch.randn(leaf64.shape, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
        with torch.no_grad():
            finite_difference = (f(leaf64 + h * v) - f(leaf64 - h * v)) / (2 * h)
        torch.testing.assert_close((grad64 * v).sum(), finite_difference, rtol=1e-6, atol=1e-9)


def test_gradient_through_classifier_on_denoised(clip_vision, sd2_clip):
    """The consumer's path: ClassifierOnDenoised.log_prob_gradient, called under inference mode, gives the
    gradient of a float64 copy of the network."""
    classifier = build(clip_vision, sd2_clip, logit_scale=10.0)
    target = torch.tensor([1, 0, 2])
    with torch.inference_mode():
        x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
        grad, log_prob = ClassifierOnDenoised(classifier.network, classifier.input_shape).log_prob_gradient(x, target)
    leaf = x.clone().double().requires_grad_(True)
    want = torch.log_softmax(copy.deepcopy(classifier.network).double()(leaf), dim=1)[[0, 1, 2], target]
    (want_grad,) = torch.autograd.grad(want.sum(), leaf)
    torch.testing.assert_close(log_prob.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert torch.linalg.vector_norm(grad - want_grad) <= 1e-4 * torch.linalg.vector_norm(want_grad)


def test_network_owns_float32_copy_of_the_vision_transformer(clip_vision, sd2_clip):
    """The loader's weights are inference tensors; the network's are ordinary float32 tensors of its own, on
    ComfyUI's offload device, frozen, in eval mode, and only the vision transformer and its projection."""
    classifier = build(clip_vision, sd2_clip)
    network = classifier.network
    source = clip_vision.model
    assert all(p.is_inference() for p in source.parameters())
    tensors = [*network.parameters(), *network.buffers()]
    assert not any(t.is_inference() for t in tensors)
    assert all(t.dtype == torch.float32 and t.device == clip_vision.patcher.offload_device for t in tensors)
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    source_storage = {p.untyped_storage().data_ptr() for p in source.parameters()}
    assert not any(p.untyped_storage().data_ptr() in source_storage for p in network.parameters())
    wanted = [*source.vision_model.parameters(), *source.visual_projection.parameters()]
    assert sum(p.numel() for p in network.parameters()) == sum(p.numel() for p in wanted)


def test_owned_copy_made_under_inference_mode_holds_ordinary_tensors():
    """owned_copy called inside a node (inference mode) on a module made there: float32 parameters and buffers
    that autograd can use, equal to the source's."""
    with torch.inference_mode():
        source = torch.nn.Sequential(torch.nn.Linear(3, 2).half(), torch.nn.BatchNorm1d(2))
        copied = owned_copy(source, torch.device("cpu"))
    assert not any(t.is_inference() for t in [*copied.parameters(), *copied.buffers()])
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in copied.parameters())
    assert copied[1].num_batches_tracked.dtype == torch.long and not copied.training
    for mine, theirs in zip(copied.state_dict().values(), source.state_dict().values()):
        torch.testing.assert_close(mine, theirs.to(mine.dtype), rtol=0, atol=0)
    x = torch.rand(4, 3, requires_grad=True)
    copied(x).sum().backward()  # would refuse to save an inference-mode weight for backward
    assert x.grad is not None


def test_classes_are_chosen_by_name(clip_vision, sd2_clip):
    """The names before the colons are the classes that Classifier Target Classes takes."""
    classifier = build(clip_vision, sd2_clip)
    targets = ClassifierTargetClasses.execute(classifier, "bird, cat", 2).result[0]
    assert targets.targets == (2, 2, 0, 0)


def test_parse_class_prompts():
    names, prompts = parse_class_prompts("cat: a photo of a cat\n\n  a photo of a dog  \nbird: a bird: flying\n")
    assert names == ("cat", "a photo of a dog", "bird")
    assert prompts == ("a photo of a cat", "a photo of a dog", "a bird: flying")


def test_unprojected_text_encoder_is_refused(clip_vision):
    """SD1.x's CLIP gives its pooled output without CLIP's text projection (SD1.x checkpoints lack it): refused,
    although its width matches the vision projection's."""
    sd1_clip = slim_clip(comfy.supported_models.SD15, clip_l=TEXT)
    with pytest.raises(ValueError, match=f"{DISPLAY_NAME}: .*without CLIP's text projection.*SD1.x.*clip_vision_h"):
        build(clip_vision, sd1_clip)


def test_mismatched_embedding_widths_are_refused(clip_vision):
    """SDXL's CLIP (pooled output: CLIP-G's, projected, here 64 wide) with a vision model projecting to 48."""
    sdxl_clip = slim_clip(comfy.supported_models.SDXL, clip_l=TEXT, clip_g=dict(TEXT, hidden_size=64))
    with pytest.raises(ValueError, match=f"{DISPLAY_NAME}: the text encoder's embeddings have 64 dimensions and the "
                                         f"CLIP vision model's {WIDTH}.*clip_vision_g"):
        build(clip_vision, sdxl_clip)


def test_vision_model_without_projection_is_refused(tmp_path_factory, sd2_clip):
    siglip = {k: v for k, v in VISION.items() if k != "projection_dim"} | {"model_type": "siglip_vision_model"}
    with pytest.raises(ValueError, match=f"{DISPLAY_NAME}: the CLIP vision model .* without CLIP's image projection"):
        build(slim_clip_vision(tmp_path_factory, siglip), sd2_clip)


@pytest.mark.parametrize("text, problem", [
    ("", "lists no class"), ("\n  \n", "lists no class"),
    ("cat: a photo of a cat\nCat: a cat", "class names cat appear more than once"),
    ("cat: a photo\ndog: a photo", "prompts 'a photo' appear more than once"),
    ("cat:", "empty class name or prompt"), (": a cat", "empty class name or prompt"),
    ("a cat, sitting", "has a comma"), ("7: a seven", "is a number"),
])
def test_bad_class_prompts_are_refused(clip_vision, sd2_clip, text, problem):
    with pytest.raises(ValueError, match=f"{DISPLAY_NAME}: .*{problem}"):
        build(clip_vision, sd2_clip, prompts=text)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_logit_scale_is_refused(clip_vision, sd2_clip, scale):
    with pytest.raises(ValueError, match=f"{DISPLAY_NAME}: logit_scale is {scale}: give a positive finite number"):
        build(clip_vision, sd2_clip, logit_scale=scale)


@pytest.mark.parametrize("prompts", [[], ["a cat", "a cat"], ["a cat", " "]])
def test_function_refuses_bad_prompt_lists(clip_vision, sd2_clip, prompts):
    with pytest.raises(ValueError, match="prompt"):
        clip_vision_classifier(clip_vision, sd2_clip, prompts)


def test_queue_time_validation():
    validate = CLIPVisionZeroShotClassifier.validate_inputs
    assert validate(class_prompts=PROMPTS, logit_scale=100.0) is True
    message = validate(class_prompts="cat: a cat\ncat: another cat", logit_scale=100.0)
    assert isinstance(message, str) and message.startswith(DISPLAY_NAME) and "cat appear more than once" in message
    assert "logit_scale is nan" in validate(class_prompts=PROMPTS, logit_scale=float("nan"))
    assert "logit_scale is 0" in validate(class_prompts=PROMPTS, logit_scale=0.0)


def test_schema():
    schema = CLIPVisionZeroShotClassifier.define_schema()
    assert (schema.node_id, schema.display_name, schema.category) == (
        "GuidanceCLIPVisionClassifier", "CLIP Vision Zero-Shot Classifier", "sampling/guidance/classifier")
    assert [spec.id for spec in schema.inputs] == ["clip_vision", "clip", "class_prompts", "logit_scale"]
    assert all(spec.tooltip for spec in schema.inputs) and "CLIP" in schema.description
    scale = schema.inputs[3]
    assert scale.default == 100.0 and scale.min > 0
    assert schema.outputs[0].io_type == "GUIDANCE_CLASSIFIER"
