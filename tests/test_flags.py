"""The command line is generated from the configuration: every field of every section has its flag, with the
field's default and its docstring as help, in its section's group; every other flag is one of the explicit few;
and --help prints."""
import argparse
import dataclasses

import pytest

from megatron_llama.arguments import (DERIVED_WHEN_NOT_GIVEN, EXPLICIT_FLAGS, FIELDS_WITHOUT_OWN_FLAG, REQUIRED,
                                      build_parser)
from megatron_llama.config import SECTIONS, ModelConfig, field_docstrings
from megatron_llama.config_checks import flag_name

FIELDS = [(section_name, section, field) for section_name, section in SECTIONS.items()
          for field in dataclasses.fields(section)]
EXPLICIT = {flag for flags in EXPLICIT_FLAGS.values() for flag in flags}


def parser_actions() -> dict[str, tuple[argparse.Action, str]]:
    """Each flag of the parser -> (its action, the title of its group)."""
    parser = build_parser()
    return {flag: (action, group.title) for group in parser._action_groups for action in group._group_actions
            for flag in action.option_strings}


def expected_default(section: type, field: dataclasses.Field):
    """The field's default; None for the model flags (not given: the preset's value, else the field's default) and
    for the flags whose value is derived when they are not given."""
    if section is ModelConfig or field.name in DERIVED_WHEN_NOT_GIVEN:
        return None
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


@pytest.mark.parametrize("section_name, section, field", FIELDS, ids=[field.name for _, _, field in FIELDS])
def test_every_field_has_a_docstring_and_its_flag_has_the_fields_default_help_and_group(section_name, section,
                                                                                        field):
    docstring = field_docstrings(section).get(field.name)
    assert docstring, f"{section.__name__}.{field.name} has no docstring"
    actions = parser_actions()
    if field.name in FIELDS_WITHOUT_OWN_FLAG:  # derived, or set by an explicit flag (which may bear its name)
        assert flag_name(field.name) not in actions or flag_name(field.name) in EXPLICIT
        return
    action, group = actions[flag_name(field.name)]
    assert action.dest == field.name and group == section_name
    assert action.help.replace("%%", "%") == docstring
    if field.name in REQUIRED:
        assert action.required
    else:
        assert not action.required and action.default == expected_default(section, field)


def test_every_flag_is_a_fields_own_or_one_of_the_explicit_flags():
    own = {flag_name(field.name) for _, _, field in FIELDS if field.name not in FIELDS_WITHOUT_OWN_FLAG}
    negations = {f"--no-{name[2:]}" for name in own}  # the --no-X of a derived switch (BooleanOptionalAction)
    flags = set(parser_actions()) - {"-h", "--help"}
    assert flags - own - EXPLICIT - negations == set()
    assert own | EXPLICIT <= flags and not own & EXPLICIT


def test_explicit_flags_sit_in_the_group_of_their_section():
    actions = parser_actions()
    for section_name, flags in EXPLICIT_FLAGS.items():
        assert section_name in SECTIONS
        assert {actions[flag][1] for flag in flags} == {section_name}


def test_help_prints_every_flag():
    text = build_parser().format_help()
    assert all(flag in text for flag in parser_actions())
