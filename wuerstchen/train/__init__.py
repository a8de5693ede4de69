"""Stage C LoRA training on the official recipe (train/train_c_lora.py of Stability-AI/StableCascade).

:mod:`.gdf` the diffusion of the training recipe, :mod:`.dataset` pictures, captions, buckets and
latents, :mod:`.lora_params` the trainable LoRA and learned tokens, :mod:`.trainer` the loop with
checkpoints and resume, :mod:`.save` the official file format. A layer above the pipeline: nothing
in the core imports it.
"""

from .dataset import DatasetError, Example, LatentSet, encode_examples, from_tensors, read_folder
from .gdf import TrainingGDF, diffusion_loss, p2_loss_weight, sample_times
from .lora_params import LearnedTokens, StageCLora, TokenSpec
from .save import lora_metadata, lora_tensors, save_lora, save_lora_file, trained_lora
from .trainer import LoraTrainer, TrainConfig

__all__ = ["DatasetError", "Example", "LatentSet", "encode_examples", "from_tensors", "read_folder", "TrainingGDF",
           "diffusion_loss", "p2_loss_weight", "sample_times", "LearnedTokens", "StageCLora", "TokenSpec",
           "lora_metadata", "lora_tensors", "save_lora", "save_lora_file", "trained_lora", "LoraTrainer",
           "TrainConfig"]
