"""Typed parameters: one frozen section per stage plus ``base``, resolved in layers.

Resolution order (later wins): schema defaults (the ``tiny`` profile) <- the profile preset in
``PROFILES`` <- the sections of ``params.yaml`` <- ``--set section.key=value`` overrides.
Every stage receives ``base`` and its own section only. Imports no torch.

Three modules, one idea each: ``schema`` (the sections and their checks), ``presets`` (what each profile changes)
and ``loading`` (reading YAML, ``--set``, layering and the error lines). Import from here.
"""

from sd_distill.params.loading import load_yaml, overrides_to_set, parse_set, read_params_file, resolve
from sd_distill.params.presets import PROFILES
from sd_distill.params.schema import (
    DEFAULT_TEMPLATES, FIRST_TEACHER_STEPS, HALVING_STEPS, PROFILE_NAMES, SECTIONS, AssembleParams, BaseParams, ClassifierParams,
    DecoderArch, DecoderParams, DMDParams, EncodeParams, EvaluateParams, GateBound, GuidanceParams, GuidanceRange,
    HalveParams, Params, ParamsError, PrepareParams, PruneParams, ReferenceParams, RegisterParams, Section, TeacherParams,
    TextArch, TrainParams, UnetArch, VaeArch, VpredParams)

__all__ = [
    "DEFAULT_TEMPLATES", "FIRST_TEACHER_STEPS", "HALVING_STEPS", "PROFILES", "PROFILE_NAMES", "SECTIONS", "AssembleParams", "BaseParams",
    "ClassifierParams", "DMDParams", "DecoderArch", "DecoderParams", "EncodeParams", "EvaluateParams", "GateBound",
    "GuidanceParams", "GuidanceRange", "HalveParams", "Params", "ParamsError", "PrepareParams", "PruneParams",
    "ReferenceParams", "RegisterParams", "Section", "TeacherParams", "TextArch", "TrainParams", "UnetArch",
    "VaeArch", "VpredParams", "load_yaml", "overrides_to_set", "parse_set", "read_params_file", "resolve"]
