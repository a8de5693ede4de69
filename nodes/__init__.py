"""ComfyUI adapters: thin node classes that translate between ComfyUI's types and the core library."""

from .conditioning import WuerstchenImageVariation, WuerstchenTextEncode
from .control import WuerstchenControlNetApply
from .decode import WuerstchenPreviewDecode, WuerstchenStageADecode
from .editing import (WuerstchenEditStageBSampler, WuerstchenLayerDecompose, WuerstchenLayerFuse,
                      WuerstchenLayerTransform)
from .latents import WuerstchenEmptyLatent, WuerstchenSemanticEncode, WuerstchenStageAEncode
from .loaders import (
    WuerstchenCheckpointLoader,
    WuerstchenCLIPTextLoader,
    WuerstchenCLIPVisionLoader,
    WuerstchenControlNetLoader,
    WuerstchenPreviewerLoader,
    WuerstchenSemanticCompressorLoader,
    WuerstchenStageALoader,
    WuerstchenStageBLoader,
    WuerstchenStageCLoader,
)
from .lora import WuerstchenLoraLoader
from .samplers import WuerstchenStageBSampler, WuerstchenStageCSampler
from .train import WuerstchenApplyTrainedLora, WuerstchenLossPlot, WuerstchenSaveLora, WuerstchenTrainStageCLora

_DISPLAY = {
    WuerstchenStageCLoader: "Wuerstchen Stage C Loader",
    WuerstchenStageBLoader: "Wuerstchen Stage B Loader",
    WuerstchenStageALoader: "Wuerstchen Stage A (VQGAN) Loader",
    WuerstchenSemanticCompressorLoader: "Wuerstchen Semantic Compressor Loader",
    WuerstchenPreviewerLoader: "Wuerstchen Previewer Loader",
    WuerstchenCLIPTextLoader: "Wuerstchen CLIP-G Text Loader",
    WuerstchenCLIPVisionLoader: "Wuerstchen CLIP Vision (ViT-L) Loader",
    WuerstchenControlNetLoader: "Wuerstchen ControlNet Loader",
    WuerstchenCheckpointLoader: "Wuerstchen Checkpoint Loader (single file)",
    WuerstchenLoraLoader: "Wuerstchen Stage C LoRA Loader",
    WuerstchenTextEncode: "Wuerstchen Text Encode",
    WuerstchenImageVariation: "Wuerstchen Image Variation",
    WuerstchenEmptyLatent: "Wuerstchen Empty Latent",
    WuerstchenSemanticEncode: "Wuerstchen Semantic Encode (img2img)",
    WuerstchenStageAEncode: "Wuerstchen Stage A Encode",
    WuerstchenStageCSampler: "Wuerstchen Stage C Sampler",
    WuerstchenStageBSampler: "Wuerstchen Stage B Sampler",
    WuerstchenControlNetApply: "Wuerstchen ControlNet Apply",
    WuerstchenStageADecode: "Wuerstchen Stage A Decode",
    WuerstchenPreviewDecode: "Wuerstchen Preview Decode",
    WuerstchenTrainStageCLora: "Wuerstchen Train Stage-C LoRA",
    WuerstchenSaveLora: "Wuerstchen Save LoRA",
    WuerstchenLossPlot: "Wuerstchen Loss Plot",
    WuerstchenApplyTrainedLora: "Wuerstchen Apply Trained LoRA",
    WuerstchenLayerDecompose: "Wuerstchen Layer Decompose",
    WuerstchenLayerTransform: "Wuerstchen Layer Transform",
    WuerstchenLayerFuse: "Wuerstchen Layer Fuse",
    WuerstchenEditStageBSampler: "Wuerstchen Edit-aware Stage B Sampler",
}

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in _DISPLAY}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: name for cls, name in _DISPLAY.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
