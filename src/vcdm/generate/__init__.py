"""Generation: batch sampling per seed in the original release's results layout, two-stage sampling
(prior → embeddings → image model → images) and image variations."""
from vcdm.generate.core import GenerateResult, LoadedModel, generate, load_model
from vcdm.generate.options import (Conditioning, GenerateError, InferenceChoices, RunOptions, SamplerOptions,
                                  results_dir, sample_dirname, seed_path)
from vcdm.generate.two_stage import IncompatibleModels, TwoStageResult, check_chain, sample_two_stage
from vcdm.generate.variations import variations

__all__ = ["Conditioning", "GenerateError", "GenerateResult", "IncompatibleModels", "InferenceChoices", "LoadedModel",
           "RunOptions", "SamplerOptions", "TwoStageResult", "check_chain", "generate", "load_model", "results_dir",
           "sample_dirname", "sample_two_stage", "seed_path", "variations"]
