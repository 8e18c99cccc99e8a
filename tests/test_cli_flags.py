"""Every `sepme` flag parses and reaches the arguments (and, for `erase`, the training settings) unchanged.

The flags are found by walking the argparse parsers, so a new flag, or a new `TrainConfig` field, is covered
without touching this file.
"""

import argparse
import subprocess
import sys
import typing
from dataclasses import fields

import pytest

from sepme_adapter.baselines.config import METHOD_FIELDS
from sepme_adapter.cli import COMMANDS, build_parser, main
from sepme_adapter.cli.erase import configs_from_args
from sepme_adapter.training.config import TrainConfig

# what each command needs besides the flag under test
REQUIRED = {
    "erase": ["--model", "m"],
    "eval": ["--model", "m"],
    "attack": ["--erasers", "e.safetensors"],
    "train-classifier": ["--model", "m", "--concept", "a=b"],
    "verify": ["--model", "m", "--erasers", "e.safetensors"],
    "push": ["a.safetensors", "org/repo"],
    "export-lora": ["a.safetensors", "-o", "out"],
    "demo": [],
    "app": [],
}
SKIPPED = (argparse._HelpAction,)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def sample(action: argparse.Action) -> tuple[list[str], object]:
    """Command-line values of the right type for `action`, and what the namespace should then hold."""
    if action.choices:
        value = list(action.choices)[-1]
        text = [str(value)]
    elif action.type is int:
        value, text = 7, ["7"]
    elif action.type is float:
        value, text = 0.375, ["0.375"]
    else:
        value, text = "some value", ["some value"]
    if action.nargs == "+":
        return text + text, [value, value]
    if isinstance(action, argparse._AppendAction):
        return text, [value]
    return text, value


def action_appends(command: str, dest: str) -> bool:
    """A repeatable flag (`--concept`): a value the command requires comes first."""
    return any(isinstance(a, argparse._AppendAction) and a.dest == dest for a in subcommands()[command]._actions)


def flag_cases():
    for name, parser in subcommands().items():
        for action in parser._actions:
            if isinstance(action, SKIPPED) or not action.option_strings or action.dest == "debug":
                continue
            for option in action.option_strings:
                if isinstance(action, argparse.BooleanOptionalAction):
                    yield pytest.param(name, [option], action.dest, not option.startswith("--no-"),
                                       id=f"{name} {option}")
                elif isinstance(action, argparse._StoreTrueAction):
                    yield pytest.param(name, [option], action.dest, True, id=f"{name} {option}")
                else:
                    text, expected = sample(action)
                    yield pytest.param(name, [option, *text], action.dest, expected, id=f"{name} {option}")


def test_the_walk_finds_every_command_and_the_generated_flags():
    commands = subcommands()
    assert set(commands) == set(COMMANDS)
    options = {o for a in commands["erase"]._actions for o in a.option_strings}
    assert {"--step-size", "--l1-weight", "--stop-below", "--momentum", "--increment-scale", "--rank",
            "--max-iterations", "--eta", "--lam", "--tau", "--alpha", "--beta", "--esd-lr"} <= options
    assert all(f"--{f.name.replace('_', '-')}" in options for f in fields(TrainConfig))  # old names stay


@pytest.mark.parametrize(("command", "flag", "dest", "expected"), list(flag_cases()))
def test_every_flag_reaches_the_arguments_unchanged(command, flag, dest, expected):
    parser = build_parser([command, *flag])
    args = parser.parse_args([command, *REQUIRED[command], *flag])
    value = getattr(args, dest)
    if isinstance(expected, list) and action_appends(command, dest) and flag[0] in REQUIRED[command]:
        expected = [REQUIRED[command][REQUIRED[command].index(flag[0]) + 1], *expected]
    assert value == expected and type(value) is type(expected)
    if command == "erase":  # and from the arguments into the settings the library gets
        config, baseline = configs_from_args(args)
        if dest in {f.name for f in fields(TrainConfig)}:
            assert getattr(config, dest) == expected and type(getattr(config, dest)) is type(expected)
        if dest in METHOD_FIELDS:
            assert getattr(baseline, dest) == expected


def test_every_train_config_field_declares_its_flag_help_and_group():
    """`training.config.setting(default, "--flag", "help in the user's words (symbol)", "common" | "advanced")`."""
    missing = [f.name for f in fields(TrainConfig) if not f.metadata.get("help") or not f.metadata.get("flag")]
    assert not missing, f"TrainConfig fields without flag / help metadata: {missing}"
    assert {f.metadata.get("group") for f in fields(TrainConfig)} <= {"common", "advanced"}
    flags = [f.metadata["flag"] for f in fields(TrainConfig)]
    assert len(flags) == len(set(flags))


def test_types_come_from_the_annotation_not_the_default():
    hints = typing.get_type_hints(TrainConfig)
    erase = subcommands()["erase"]
    by_dest = {a.dest: a for a in erase._actions if a.help != argparse.SUPPRESS}
    for item in fields(TrainConfig):
        kinds = [k for k in typing.get_args(hints[item.name]) if k is not type(None)] or [hints[item.name]]
        action = by_dest[item.name]
        if kinds[0] is bool:
            assert isinstance(action, argparse.BooleanOptionalAction)
        elif kinds[0] in (int, float):
            assert action.type is kinds[0], item.name
    args = build_parser().parse_args(["erase", "--model", "m", "--rank", "4"])
    config, _ = configs_from_args(args)
    assert config.rank == 4 and type(config.rank) is int
    config.validate()  # `sepme erase --rank 4` makes a rank-4 eraser, no longer "got 4.0"


def test_old_names_are_hidden_aliases_and_presets_yield_to_flags():
    text = subcommands()["erase"].format_help()
    assert "--step-size" in text and "(eta)" in text and "(lambda" in text and "(tau" in text
    for old in ("--eta ", "--lam ", "--tau ", "--alpha ", "--beta "):
        assert old not in text
    args = build_parser().parse_args(["erase", "--model", "m", "--preset", "paper", "--beta", "0.5", "--eta", "0.2"])
    config, _ = configs_from_args(args)
    assert config.beta == 0.5 and config.eta == 0.2 and config.lam == TrainConfig.paper().lam


def test_baseline_settings_are_listed_only_with_a_method(capsys):
    assert "--esd-lr" not in subcommands()["erase"].format_help()
    with pytest.raises(SystemExit):
        main(["erase", "--method", "esd", "--help"])
    text = capsys.readouterr().out
    assert "--esd-lr" in text and "--uce-lambda" not in text


def test_the_commands_constants_match_the_library():
    from sepme_adapter.cli import demo, export_lora, options, verify
    from sepme_adapter.demo import MODELS
    from sepme_adapter.demo.job import BATCH_SIZE
    from sepme_adapter.eraser import Eraser
    from sepme_adapter.hub import LORA_FORMATS
    from sepme_adapter.pipelines import DTYPES
    from sepme_adapter.verify import MIN_EFFECT

    assert options.DTYPES == DTYPES and export_lora.LORA_FORMATS == LORA_FORMATS
    assert demo.MODELS == MODELS and demo.BATCH_SIZE == BATCH_SIZE and verify.MIN_EFFECT == MIN_EFFECT
    # one beta default: an Eraser made by hand scales like a trained one
    assert Eraser.__dataclass_fields__["beta"].default == TrainConfig().beta


def test_bare_sepme_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: sepme" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)], ids=lambda c: " ".join(c) or "sepme")
def test_help_loads_neither_torch_nor_diffusers(command):
    code = (f"import sys\nfrom sepme_adapter.cli import main\ntry:\n    main({[*command, '--help']!r})\n"
            f"except SystemExit:\n    pass\n"
            f"print('LOADED', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "usage: sepme" in result.stdout and "LOADED []" in result.stdout, result.stdout + result.stderr
