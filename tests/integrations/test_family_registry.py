"""The family registry is the one table: every family file yields a registered family, its π-Flow pipeline class
(one call skeleton, the family's signature and docstring) exported by the package, and aliases for every
architecture; a family registered at run time gets its pipeline class too."""
import dataclasses
import inspect

import pytest

pytest.importorskip("diffusers")

import piflow.integrations.diffusers as package  # noqa: E402
from piflow.integrations.diffusers import families  # noqa: E402
from piflow.integrations.diffusers.families import ARCHITECTURES, FAMILIES, register_family  # noqa: E402
from piflow.integrations.diffusers.families.calls import COMMON_PARAMETERS  # noqa: E402
from piflow.integrations.diffusers.pipelines import PiFlowPipelineMixin, pipeline_class  # noqa: E402
from piflow.integrations.diffusers.students import DiffusersPolicyStudent, DiffusersTeacher  # noqa: E402


def test_every_family_file_registers_its_families():
    import pkgutil

    files = {m.name for m in pkgutil.iter_modules(families.__path__)} - set(families.SHARED_MODULES)
    assert files == {"dit", "flux", "flux2", "flux_kontext", "longcat", "pixart", "qwen", "qwen_edit", "sd15", "sd3",
                     "sdxl", "wan", "zimage"}
    registered = {name for file in files for name in (f.name for f in getattr(families, file).FAMILIES)}
    assert registered == set(FAMILIES) and len(FAMILIES) == 15
    modules = [getattr(families, file) for file in files]
    own = {module.ARCHITECTURE.name for module in modules if hasattr(module, "ARCHITECTURE")}
    assert {f.architecture for f in FAMILIES.values()} == own and own <= set(ARCHITECTURES)   # + any registered later


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_has_one_exported_pipeline_class_with_its_signature(name):
    import diffusers

    family = FAMILIES[name]
    cls = pipeline_class(name)
    assert cls.__name__ == family.pi_pipeline and getattr(package, family.pi_pipeline) is cls
    assert issubclass(cls, PiFlowPipelineMixin) and issubclass(cls, getattr(diffusers, family.stock_pipeline))
    assert cls.piflow_family == name and cls.architecture_name == family.architecture
    parameters = inspect.signature(cls.__call__).parameters
    assert set(COMMON_PARAMETERS) | set(family.pipeline.params) | set(family.pipeline.unused) <= set(parameters)
    assert [p for p in parameters if parameters[p].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD] == [
        "self", *(n for n, _ in family.pipeline.positional)]
    assert cls.__call__.__doc__ == family.pipeline.doc and family.pipeline.doc


@pytest.mark.parametrize("name", sorted({f.architecture for f in FAMILIES.values()}))
def test_every_architecture_has_teacher_and_student_aliases(name):
    alias = ARCHITECTURES[name].alias
    family = next(f for f in FAMILIES.values() if f.architecture == name)
    transformer = family.tiny(4, 0)[family.denoiser]          # a transformer, or the UNet of SD 1.5 / SDXL
    teacher = getattr(package, f"{alias}Teacher")(transformer)
    student = getattr(package, f"{alias}PolicyStudent")(transformer, "gmflow", num_components=2,
                                                         latent_channels=16 if name == "longcat" else 4,  # its tiny
                                                         logstd_hidden=16, share_transformer=True)
    assert isinstance(teacher, DiffusersTeacher) and teacher.architecture is ARCHITECTURES[name]
    assert isinstance(student, DiffusersPolicyStudent) and student.architecture is ARCHITECTURES[name]


def test_a_family_registered_at_run_time_gets_its_pipeline_class():
    family = dataclasses.replace(FAMILIES["sd3"], name="sd3-copy", pi_pipeline="PiSD3CopyPipeline")
    register_family(family)
    try:
        cls = pipeline_class("sd3-copy")
        assert cls.__name__ == "PiSD3CopyPipeline" and cls.piflow_family == "sd3-copy"
        assert cls is not pipeline_class("sd3") and pipeline_class("sd3-copy") is cls
    finally:
        del FAMILIES["sd3-copy"]
