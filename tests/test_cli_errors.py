"""Every failure a user can cause ends in one line, `sepme COMMAND: error: ...`, and a non-zero exit status
(the traceback only with --debug or SEPME_DEBUG=1); suspect results print a warning line."""

from types import SimpleNamespace

import pytest
import torch

import sepme_adapter
from sepme_adapter import TrainingError
from sepme_adapter.cli import main
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.training.concepts import read_concepts_csv

from .helpers import make_eraser


def one_error_line(captured: str, command: str) -> str:
    lines = [line for line in captured.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"sepme {command}: error: "), captured
    return lines[0]


@pytest.fixture
def eraser_file(pipe, tmp_path):
    return str(make_eraser(pipe, "vangogh").save(tmp_path / "vangogh.safetensors"))


def test_push_offline_is_one_line_and_debug_shows_the_traceback(eraser_file, monkeypatch, capsys):
    import sepme_adapter.hub

    class ConnectError(Exception):  # httpx's, by name (huggingface_hub >= 1 raises it; requests' ConnectionError too)
        pass

    def offline(*args, **kwargs):
        try:
            raise ConnectError("[Errno -3] Temporary failure in name resolution")
        except ConnectError as error:  # as huggingface_hub raises it: wrapped, the ConnectError its cause
            raise RuntimeError("request failed") from error

    monkeypatch.setattr(sepme_adapter.hub, "push_to_hub", offline)
    monkeypatch.delenv("SEPME_DEBUG", raising=False)
    assert main(["push", eraser_file, "org/erasers"]) == 1
    line = one_error_line(capsys.readouterr().err, "push")
    assert "cannot reach the Hugging Face Hub" in line and "--debug" in line
    assert main(["push", eraser_file, "org/erasers", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("SEPME_DEBUG", "1")
    assert main(["push", eraser_file, "org/erasers"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line(capsys):
    assert main(["verify", "--model", "some/model", "--erasers", "x.safetensors", "--device", "cuda"]) == 2
    line = one_error_line(capsys.readouterr().err, "verify")
    assert "no CUDA GPU" in line and "--device cpu" in line


def test_a_model_path_that_does_not_exist_is_folder_not_found(tmp_path, capsys):
    for model in ("/nonexistent", str(tmp_path / "missing" / "model"), "./my-model"):
        assert main(["verify", "--model", model, "--erasers", "x.safetensors", "--device", "cpu"]) == 2
        line = one_error_line(capsys.readouterr().err, "verify")
        assert "model folder not found" in line and "repo" not in line.split("(")[0]


def test_set_erased_none_says_what_to_pass(pipe, erasers):
    for eraser in erasers.values():
        pipe.load_sepme(eraser)
    with pytest.raises(TypeError, match=r"set_erased\(\[\]\) restores the original"):
        pipe.set_erased(None)
    with pytest.raises(TypeError, match="list of names"):
        pipe.set_erased(3)


def test_concept_files_with_a_bom_or_spaces_are_read_and_a_bad_header_is_shown(tmp_path):
    path = tmp_path / "concepts.csv"
    path.write_bytes("\ufeffname,prompt\nmonet,a painting by monet\n".encode())  # Excel's "CSV UTF-8"
    assert [c.name for c in read_concepts_csv(path)] == ["monet"]
    path.write_text("name, prompt\nmonet, a painting by monet\n")
    assert read_concepts_csv(path)[0].prompts == ("a painting by monet",)
    path.write_text("concept;text\nx;y\n")
    with pytest.raises(TrainingError, match="its first row is 'concept;text'"):
        read_concepts_csv(path)
    path.write_bytes(b"name,prompt\nx,\xff\xfe\n")
    with pytest.raises(TrainingError, match="not UTF-8"):
        read_concepts_csv(path)


def test_a_prompt_longer_than_the_tokenizer_takes_is_refused(model_folder, tmp_path, capsys):
    limit = tiny_pipeline().tokenizer.model_max_length
    prompt = " ".join(["painting"] * (limit + 2))
    code = main(["erase", "--model", str(model_folder), "--out", str(tmp_path), "--concept", f"long={prompt}",
                 "--quiet", "--device", "cpu"])
    assert code == 2
    line = one_error_line(capsys.readouterr().err, "erase")
    assert "tokens long" in line and f"at most {limit}" in line and not list(tmp_path.iterdir())


def test_eval_names_the_flag_for_a_base_model_mismatch(model_folder, tmp_path, capsys):
    other = sepme_adapter.attach(tiny_pipeline(seed=3))
    make_eraser(other, "vangogh").save(tmp_path / "erasers" / "vangogh.safetensors")
    code = main(["eval", "--model", str(model_folder), "--erasers", str(tmp_path / "erasers"), "--classifier",
                 "tests.helpers:brightness", "--quiet", "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert code == 2
    line = one_error_line(capsys.readouterr().err, "eval")
    assert "--allow-base-mismatch" in line and "allow_base_mismatch=True" not in line


def test_unexpected_errors_are_one_line_with_their_type(monkeypatch, capsys, eraser_file):
    import sepme_adapter.hub

    def broken(*args, **kwargs):
        raise RuntimeError("something\nwent\n  wrong")

    monkeypatch.setattr(sepme_adapter.hub, "export_lora", broken)
    monkeypatch.delenv("SEPME_DEBUG", raising=False)
    assert main(["export-lora", eraser_file, "-o", "out"]) == 1
    assert "RuntimeError: something went wrong" in one_error_line(capsys.readouterr().err, "export-lora")


# ------------------------------------------------------------------ warnings where a result is suspect
def test_an_eraser_that_never_met_its_stop_gets_a_warning(tmp_path, capsys):
    from sepme_adapter.cli.erase import report_eraser

    config = {"stop": "momentum", "stop_on": "rho", "tau": -0.25}
    ran_out = SimpleNamespace(name="vangogh", metadata={
        "stats": {"iterations": 400, "stopped_early": False, "final_rho": 0.31, "dtheta_p": 1.0},
        "training": {"method": "sepme", "config": config}})
    report_eraser(ran_out, tmp_path / "vangogh.safetensors")
    err = capsys.readouterr().err
    assert "sepme erase: warning: vangogh ran all 400 iterations without meeting its stop (rho <= -0.25" in err
    stopped = SimpleNamespace(name="picasso", metadata={
        "stats": {"iterations": 40, "stopped_early": True, "dtheta_p": 1.0},
        "training": {"method": "sepme", "config": config}})
    report_eraser(stopped, tmp_path / "picasso.safetensors")
    assert capsys.readouterr().err == ""


def test_the_progress_bar_shows_the_target():
    from sepme_adapter.training.loop import progress_text

    track = SimpleNamespace(probes=None, probe_history=[], relative=[0.52], history=[0.1],
                            stop=SimpleNamespace(value=0.8))
    momentum = SimpleNamespace(stop="momentum", stop_on="rho", tau=-0.25, erase_to=-0.25)
    assert progress_text(track, momentum) == "rho +0.52 (avg +0.80) -> <= -0.25"
    track.probes, track.probe_history = object(), [{"rho": 0.3}]
    assert progress_text(track, momentum) == "probe rho +0.30 -> <= -0.25"


def test_a_folder_that_holds_erasers_is_refused_without_overwrite(pipe, tmp_path, capsys):
    from sepme_adapter.cli.erase import check_output_folder

    make_eraser(pipe, "vangogh").save(tmp_path / "vangogh.safetensors")
    (tmp_path / "training_report.json").write_text("{}")
    (tmp_path / "notes.safetensors").write_bytes(b"not an eraser")
    args = SimpleNamespace(resume=False, overwrite=False)
    with pytest.raises(TrainingError, match="already holds erasers \\(vangogh.safetensors\\); pass --overwrite"):
        check_output_folder(args, tmp_path, True)
    check_output_folder(SimpleNamespace(resume=True, overwrite=False), tmp_path, True)  # --resume continues
    check_output_folder(SimpleNamespace(resume=False, overwrite=True), tmp_path, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors"]  # only erasers and the report go
    assert "removed 1 earlier eraser" in capsys.readouterr().err
    check_output_folder(args, tmp_path, True)  # nothing left to refuse


def test_a_classifier_at_or_below_chance_gets_a_warning(monkeypatch, capsys):
    import sepme_adapter.evaluation
    from sepme_adapter.cli import train_classifier

    pipe = SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)
    monkeypatch.setattr(train_classifier, "load_model", lambda args: pipe)
    result = {"held_out_accuracy": 0.25, "imagenet_backbone": False, "labels": ["a", "b", "c", "blank"]}
    monkeypatch.setattr(sepme_adapter.evaluation, "train_style_classifier", lambda *a, **k: result)
    args = ["train-classifier", "--model", "m", "--concept", "a=x", "--concept", "b=y", "--concept", "c=z"]
    assert main(args) == 0
    assert "warning: held-out accuracy 0.250 is at or below chance (0.250" in capsys.readouterr().err
    result["held_out_accuracy"] = 0.9
    assert main(args) == 0
    assert "warning" not in capsys.readouterr().err


def test_an_evaluation_whose_classifier_misses_the_original_gets_a_warning(capsys):
    from sepme_adapter.cli.evaluate import warn_blind_classifier

    warn_blind_classifier({"original": {"accuracy": {"vangogh": 0.0, "picasso": 0.9}}})
    err = capsys.readouterr().err
    assert "warning: the classifier recognises vangogh in at most 5%" in err and "picasso" not in err


def test_quiet_silences_the_libraries_loading_bars():
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    from sepme_adapter.cli.options import silence_libraries

    try:
        silence_libraries()
        assert not diffusers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
        diffusers_logging.set_verbosity_warning()
        transformers_logging.set_verbosity_warning()


def test_bad_settings_are_refused_in_the_flags_names_before_the_model_loads(capsys):
    assert main(["erase", "--model", "/nonexistent", "--concept", "a", "--rank", "0"]) == 2
    assert "--rank must be a positive integer" in one_error_line(capsys.readouterr().err, "erase")
    assert main(["erase", "--model", "/nonexistent", "--concept", "a", "--eta", "-1"]) == 2  # an old name too
    assert "--step-size must be > 0" in one_error_line(capsys.readouterr().err, "erase")


def test_push_with_the_hub_switched_off_is_one_line(eraser_file, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets it
    monkeypatch.delenv("SEPME_DEBUG", raising=False)
    assert main(["push", eraser_file, "org/erasers", "--token", "hf_test"]) == 1
    assert "HF_HUB_OFFLINE is set" in one_error_line(capsys.readouterr().err, "push")
