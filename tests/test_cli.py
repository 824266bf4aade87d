"""The `kd` command itself: stages, Hydra flags anywhere, completion, and a one-line error with a
non-zero exit for each kind of bad input. The command runs in a subprocess where the process is what is
tested (help, completion, the exit status, the debug switch); the many checks of what the command
prints run it in this process (`kd_here`), which is the same code without a new interpreter each time."""

from __future__ import annotations

import pytest
from kdrun import FAST, Result, assert_one_line_error, kd, kd_here, kd_ok


def test_kd_alone_lists_the_stages(tmp_path):
    result = kd_ok(cwd=tmp_path)
    for stage in ("train-teacher", "distill", "evaluate"):
        assert stage in result.stdout


def test_stage_help_shows_config_groups(tmp_path):
    out = kd_ok("distill", "--help", cwd=tmp_path).stdout
    for group in ("dataset:", "method:", "student:", "teacher:", "trainer:", "optim:", "augmentation:"):
        assert group in out
    assert "cifar100" in out and "resnet32x4" in out


def test_flags_may_stand_after_overrides(tmp_path):
    out = here_ok("distill", "dataset=mnist", "--cfg", "job", "student=resnet8x4", cwd=tmp_path).stdout
    assert "name: mnist" in out and "arch: resnet8x4" in out
    assert "default_teacher: cnn" in out


def test_dataset_defaults_flow_into_teacher_and_student(tmp_path):
    out = here_ok("distill", "dataset=cifar100", "--cfg", "job", "--resolve", cwd=tmp_path).stdout
    assert "arch: resnet32x4" in out and "arch: resnet8x4" in out


def test_model_options_can_be_set_without_plus(tmp_path):
    out = here_ok("distill", "student.kwargs.hidden=[16]", "--cfg", "job", cwd=tmp_path).stdout
    assert "hidden:\n    - 16" in out


def test_info_and_user_config_dir(tmp_path):
    user = tmp_path / "myconf" / "dataset"
    user.mkdir(parents=True)
    (user / "tiny.yaml").write_text(
        "name: synthetic\nroot: x\ndownload: false\nnum_train: 64\nnum_test: 32\nnum_classes: 3\n"
        "channels: 1\nimage_size: 8\nseed: 0\nmean: [0.5]\nstd: [0.25]\ndefault_teacher: cnn\n"
        "default_student: mlp\nhflip: false\ncrop_padding: 1\n"
    )
    out = here_ok("distill", "-cd", str(tmp_path / "myconf"), "dataset=tiny", "--cfg", "job", cwd=tmp_path).stdout
    assert "num_classes: 3" in out
    info = here_ok("distill", "--info", "searchpath", cwd=tmp_path).stdout
    assert "pkg://kd_cli.configs" in info


def test_bash_completion_of_stages_and_options(tmp_path):
    script = kd_ok("-sc", "install=bash", cwd=tmp_path).stdout
    assert "complete" in script and "hydra_bash_completion" in script
    stages = kd_ok("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "kd di", "COMP_POINT": "5"}).stdout
    assert stages.split() == ["distill"]
    options = kd_ok(
        "distill", "-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "kd distill dataset=", "COMP_POINT": "19"}
    ).stdout
    assert "dataset=digits" in options.split() and "dataset=cifar100" in options.split()


BAD_INPUTS = [
    (["disitl"], ["unknown stage 'disitl'", "distill"]),
    (["distill", "trainer.epoch=3"], ["trainer.epoch is not an option (did you mean trainer.epochs?)"]),
    (["distill", "dataset.rooot=x"], ["dataset.rooot is not an option (did you mean dataset.root?)", "dataset has:"]),
    (["distill", "trainer.epochs=abc"], ["trainer.epochs=abc"]),
    (["distill", "student=resnt18"], ["student/resnt18", "did you mean resnet18"]),
    # an option whose name the message quotes is still listed (pkd is in 'method/pkdd')
    (["distill", "method=pkdd"], ["Available options in 'method': ab, ", " pkd, ", "did you mean pkd"]),
    (["distill", "method.temprature=3"], ["method.temprature is not an option (did you mean method.temperature?)"]),
    (["distill", "student.kwargs.widht=3", "student=cnn"], ["widht", "width"]),
    (["distill", "trainer.device=cuda"], ["no CUDA GPU", "trainer.device=cpu"]),
    (["distill", "trainer.device=tpu"], ["trainer.device=tpu"]),
    (["distill", "trainer.precision=fp8"], ["trainer.precision=fp8"]),
    (["distill", "optim.lr=-1"], ["optim.lr"]),
    (["distill", "optim.momentum=0", "optim.nesterov=true"], ["optim.nesterov=true needs optim.momentum > 0"]),
    (["distill", "optim=adamw", "optim.momentum=0.5"], ["optim.momentum=0.5 does nothing with optim=adamw"]),
    (["distill", "optim.betas=abc"], ["optim.betas takes a list"]),
    (["distill", "dataset.crop_padding=-1"], ["dataset.crop_padding=-1 must be a whole number >= 0"]),
    (["distill", "trainer.epochs='3"], ["Hydra cannot read the override", "quotes and brackets"]),
    (["distill", "trainer.epochs=[3"], ["Hydra cannot read the override"]),
    (["distill", "method.temperature=1e308"], ["method.temperature=1e+308 must be a number in (0, 1000]"]),
    (["distill", "teacher_cache.max_gb=1e308"], ["teacher_cache.max_gb=1e+308 must be in (0, 1073741824]"]),
    (["train-teacher", "student=mlp"], ["student= is not a setting of this stage"]),
    (["distill", "trainer.batch_size=0"], ["trainer.batch_size"]),
    (["distill", "method.temperature=0", "teacher.checkpoint=x"], []),
    (["distill", "dataset=cifar100", "student=resnet18"], ["cifar-100-python", "dataset.download=true"]),
    (["distill", "dataset=imagefolder"], ["dataset.root"]),
    (["train-teacher", "method=kd"], ["method=none"]),
    (["evaluate"], ["run="]),
    (["evaluate", "run=/no/such/run"], ["/no/such/run"]),
    (["evaluate", "run="], ["run= is empty"]),
    (["evaluate", "run=/no/such/run", "dataset.root=x"], ["dataset.root cannot be set while dataset is not chosen"]),
    (["distill", "resume=/no/such/run"], ["resume=/no/such/run"]),
]


@pytest.mark.parametrize("args, fragments", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_non_zero(tmp_path, args, fragments):
    result = kd_here(*args, *FAST, f"paths.outputs={tmp_path / 'out'}", f"paths.data={tmp_path / 'data'}", cwd=tmp_path)
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize("args, fragments", BAD_INPUTS[:2] + BAD_INPUTS[-6:-5])
def test_the_real_process_prints_one_line_and_exits_2(tmp_path, args, fragments):
    result = kd(*args, *FAST, f"paths.outputs={tmp_path / 'out'}", f"paths.data={tmp_path / 'data'}", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert result.code == 2


def here_ok(*args: str, cwd) -> Result:
    result = kd_here(*args, cwd=cwd)
    assert result.code == 0, (
        f"kd {' '.join(args)} failed ({result.code}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def test_debug_switch_shows_the_traceback(tmp_path):
    # (kdrun.kd removes KD_DEBUG from the environment on purpose; --debug works the same way)
    result = kd("distill", "trainer.device=tpu", "--debug", cwd=tmp_path)
    assert result.code != 0 and "Traceback" in result.stderr


def test_a_sweep_over_methods_takes_an_option_only_some_of_them_have():
    """Hydra composes the default method first in a multirun: `method.X=` is opened (`++`) when `method=` is
    swept, and each job's options are then checked against its own method (tested through the CLI in
    test_method_table's sweep over at,nst with tuned_input_size)."""
    from kd_cli.overrides import open_swept_method_options

    swept = ["method=at,nst", "method.tuned_input_size=32", "seed=0,1", "student.kwargs.width=4"]
    assert open_swept_method_options(swept) == [
        "method=at,nst",
        "++method.tuned_input_size=32",
        "seed=0,1",
        "student.kwargs.width=4",
    ]
    single = ["method=at", "method.tuned_input_size=32"]
    assert open_swept_method_options(single) == single


def test_library_warnings_are_one_kd_line_each(tmp_path, capsys):
    """A library's warning (torch's UserWarnings, Pillow's, ...) reaches the user as one `kd: warning:` line,
    once per message, in kd's words where kd knows it; never the library's report with its source line."""
    import warnings

    from kd_cli import errors

    with warnings.catch_warnings():
        warnings.resetwarnings()
        errors.library_warnings_as_kd_lines()
        for _ in range(2):
            warnings.warn("Casting complex values to real discards the imaginary part\nmore", UserWarning, stacklevel=1)
        warnings.warn(
            "This DataLoader will create 8 worker processes in total. Our suggested max number of worker in current "
            "system is 2, which is smaller than what this DataLoader is going to create.",
            UserWarning,
            stacklevel=1,
        )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [
        "kd: warning: Casting complex values to real discards the imaginary part (UserWarning from test_cli)",
        "kd: warning: trainer.num_workers=8 is more than the 2 this machine can run at once; lower it "
        "(trainer.num_workers=2), or loading may slow training down or freeze",
    ]
