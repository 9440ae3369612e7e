"""ComfyUI nodes that give the classifier-guided nodes (EluCD) their classifier and target classes.

A classifier travels between nodes as a GUIDANCE_CLASSIFIER (`guiders.classifier.ImageClassifier`); choosing the
classes to guide towards binds it to one target per image, a GUIDANCE_CLASSIFIER_TARGETS (`classifier_patch.ClassifierTargets`).
"""

from comfy_api.latest import io

from ..guiders.classifier import ALL_CLASSES, target_classes
from .classifier_patch import DEFAULT_CLASSIFIER, ClassifierTargets, classifier_files, reference_classifier
from .validation import Rule, check_widgets

GuidanceClassifier = io.Custom("GUIDANCE_CLASSIFIER")
GuidanceClassifierTargets = io.Custom("GUIDANCE_CLASSIFIER_TARGETS")
LOADER_DISPLAY_NAME = "Load Guidance Reference Classifier"
TARGETS_NODE_ID = "GuidanceClassifierTargets"
TARGETS_DISPLAY_NAME = "Classifier Target Classes"


class ReferenceClassifierLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GuidanceReferenceClassifierLoader",
            display_name=LOADER_DISPLAY_NAME,
            category="sampling/guidance/classifier",
            description="Loads the pack's classifier of the reference model's images (Fashion-MNIST, 10 classes, "
            "trained on clean images only), for classifier guidance of the reference model with EluCD. Connect "
            "the reference model's VAE to the guidance node.",
            inputs=[
                io.Combo.Input("weights", options=classifier_files(), default=DEFAULT_CLASSIFIER,
                               tooltip="Classifier weights in the pack's reference/weights folder."),
            ],
            outputs=[GuidanceClassifier.Output(display_name="classifier",
                                               tooltip="The classifier; choose its target classes next.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        try:
            return io.NodeOutput(reference_classifier(weights))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{LOADER_DISPLAY_NAME}: {e}.") from e


def targets_rule(values: dict) -> str | None:
    """Queue-time check of the class list: its form, and indices that no classifier has (negative)."""
    text = values.get("classes")
    if text is None or text.strip().lower() == ALL_CLASSES:
        return None
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        return f"classes {text!r} has an empty entry: list class names or numbers separated by single commas"
    negative = [item for item in items if item.startswith("-") and item[1:].isdigit()]
    if negative:
        return f"classes has {', '.join(negative)}: class numbers start at 0"
    return None


class ClassifierTargetClasses(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=TARGETS_NODE_ID,
            display_name=TARGETS_DISPLAY_NAME,
            category="sampling/guidance/classifier",
            description="The class each image of the batch is guided towards. The list is repeated "
            "images_per_class times per class, in the order the reference model's class conditioning uses, so "
            "'all classes' with the same images_per_class matches Reference Class Conditioning image for image.",
            inputs=[
                GuidanceClassifier.Input("classifier", tooltip="From a classifier loader."),
                io.String.Input("classes", default=ALL_CLASSES,
                                tooltip="Class names or numbers (from 0), separated by commas, e.g. 'sneaker, bag' "
                                "or '7, 8'; 'all classes' takes every class in turn. One class guides every image."),
                io.Int.Input("images_per_class", default=1, min=1, max=4096,
                             tooltip="How many consecutive images of the batch each listed class gets."),
            ],
            outputs=[GuidanceClassifierTargets.Output(display_name="targets",
                                                      tooltip="The classifier with one target class per image.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values, Rule(("classes",), targets_rule))

    @classmethod
    def execute(cls, classifier, classes, images_per_class) -> io.NodeOutput:
        try:
            targets = target_classes(classes, classifier.class_names, images_per_class)
        except ValueError as e:
            raise ValueError(f"{TARGETS_DISPLAY_NAME}: {e}.") from e
        return io.NodeOutput(ClassifierTargets(classifier, targets))

