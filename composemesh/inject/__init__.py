"""The injector: compose files in, a meshed compose model out, and the plan shown to the user."""

from composemesh.inject.compose_file import (
    LoadedProject,
    compose_config_check,
    dump_yaml,
    load_project,
)
from composemesh.inject.plan import plan_rows, render_plan
from composemesh.inject.replicas import collisions, injected_names
from composemesh.inject.rewrite import AddedService, InjectResult, ServicePlan, inject
from composemesh.inject.validate import ValidatedProject, validate_model, validate_project

__all__ = [
    "AddedService",
    "InjectResult",
    "LoadedProject",
    "ServicePlan",
    "ValidatedProject",
    "collisions",
    "compose_config_check",
    "dump_yaml",
    "inject",
    "injected_names",
    "load_project",
    "plan_rows",
    "render_plan",
    "validate_model",
    "validate_project",
]
