"""The pack's ComfyUI extension: the list of its nodes."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .adaptive import AdaptiveGuidance, FitLinearAG, LinearAG
from .agd import AGDApply, AGDTrain
from .apg import AdaptiveProjectedGuidance
from .cfgpp import CFGppDDIMInversion, CFGppDDIMSampleFromInversion, CFGppSampler
from .classifier import ClassifierTargetClasses, ReferenceClassifierLoader
from .clip_classifier import CLIPVisionZeroShotClassifier
from .elucd import EluCDClassifierGuidance
from .frecas import FreCaSSampler
from .pag import PerturbedAttentionGuidance
from .ppap import PPAPClassifierGuidance, PPAPLoadExperts, PPAPTrainExperts
from .reference import EmptyReferenceLatent, ReferenceClassConditioning, ReferenceModelLoader
from .saliency import SaliencyMapFromMarkers, SaliencyMarkersFromPoints


class GuidanceExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [AdaptiveProjectedGuidance, ReferenceModelLoader, ReferenceClassConditioning, EmptyReferenceLatent,
                PerturbedAttentionGuidance, CFGppSampler, CFGppDDIMInversion, CFGppDDIMSampleFromInversion,
                AdaptiveGuidance, LinearAG, FitLinearAG, ReferenceClassifierLoader, CLIPVisionZeroShotClassifier,
                ClassifierTargetClasses, EluCDClassifierGuidance, SaliencyMarkersFromPoints, SaliencyMapFromMarkers,
                AGDApply, AGDTrain, FreCaSSampler, PPAPTrainExperts, PPAPLoadExperts, PPAPClassifierGuidance]
