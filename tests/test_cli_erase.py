"""`sepme erase` on a local diffusers folder, in one process and split over 2 CPU processes."""

import os
import shutil
import subprocess
import sys

import pytest

import sepme_adapter
from sepme_adapter import Eraser, TrainingError
from sepme_adapter.cli import main
from sepme_adapter.pipelines import load_pipeline
from sepme_adapter.testing import tiny_pipeline

ARGS = ["--concept", "vangogh=a painting by van gogh", "--concept", "picasso=a painting by picasso",
        "--protect", "watermark", "--max-iterations", "5", "--images-per-concept", "2",
        "--reference-steps", "2", "--beta", "0.1", "--lr", "0.1", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def single_process(model_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("erasers")
    assert main(["erase", "--model", str(model_folder), "--out", str(out), *ARGS]) == 0
    return out


def test_erase_writes_one_file_per_concept_and_a_report(single_process):
    names = sorted(p.name for p in single_process.iterdir())
    assert {"vangogh.safetensors", "picasso.safetensors", "training_report.json", "loss_curves.png"} <= set(names)
    eraser = Eraser.load(single_process / "vangogh.safetensors")
    assert eraser.known == {"picasso": ["a painting by picasso"]} and eraser.protected == ["watermark"]
    assert eraser.metadata["training"]["config"]["max_iterations"] == 5


def test_erasers_load_onto_the_same_model_loaded_from_its_folder(single_process, model_folder):
    pipe = load_pipeline(str(model_folder), device="cpu")
    assert isinstance(pipe, sepme_adapter.SepMELoaderMixin) or hasattr(pipe, "load_sepme")
    assert sorted(pipe.load_sepme(single_process)) == ["picasso", "vangogh"]
    other = sepme_adapter.attach(tiny_pipeline(seed=3))
    with pytest.raises(sepme_adapter.BaseModelMismatchError):
        other.load_sepme(single_process / "vangogh.safetensors")


def test_bad_cli_input_exits_2_with_a_message(model_folder, tmp_path, capsys):
    code = main(["erase", "--model", str(model_folder), "--out", str(tmp_path), "--concept", "a=x",
                 "--known", "a=y", "--quiet", "--device", "cpu"])
    assert code == 2 and "repeated" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate's launcher is not installed")
def test_accelerate_launch_splits_concepts_across_two_cpu_processes(model_folder, single_process, tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
               "-m", "sepme_adapter.cli", "erase", "--model", str(model_folder), "--out", str(tmp_path), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["process-0", "process-1"]
    for name in ("vangogh", "picasso"):
        split = Eraser.load(tmp_path / f"{name}.safetensors")
        together = Eraser.load(single_process / f"{name}.safetensors")
        assert split.metadata["history"]["l_cor"] == pytest.approx(together.metadata["history"]["l_cor"], rel=1e-3)


def test_concepts_come_from_repeated_flags_templates_and_a_csv_file(tmp_path):
    from types import SimpleNamespace

    from sepme_adapter.cli.erase import concepts_to_erase, parse_concepts
    from sepme_adapter.training import Concept

    table = tmp_path / "concepts.csv"
    table.write_text("name,prompt\nmonet,a painting by monet\nmonet,monet style\ndog,a photo of a dog\n")
    args = SimpleNamespace(concept=["vangogh", "picasso=a painting by picasso", "picasso=picasso style"],
                           templates="style", concepts_file=str(table))
    concepts = {c.name: c.prompts for c in concepts_to_erase(args)}
    assert concepts == {
        "vangogh": ("a painting by vangogh", "in the style of vangogh", "vangogh style", "an artwork by vangogh"),
        "picasso": ("a painting by picasso", "picasso style"),  # explicit prompts are not templated
        "monet": ("a painting by monet", "monet style"),
        "dog": ("a photo of a dog",),
    }
    assert parse_concepts(["cat"], "object")[0] == Concept("cat", prompts=(
        "a cat", "a photo of a cat", "a picture of a cat", "an image of a cat"))
    table.write_text("concept,text\nx,y\n")
    with pytest.raises(TrainingError, match="name,prompt"):
        concepts_to_erase(SimpleNamespace(concept=None, templates=None, concepts_file=str(table)))
    with pytest.raises(TrainingError, match="no concept to erase"):
        concepts_to_erase(SimpleNamespace(concept=None, templates=None, concepts_file=None))
