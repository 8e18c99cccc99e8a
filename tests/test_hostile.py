"""Hostile inputs and faults: every bad file ends in EraserFileError, never a silent wrong model."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import sepme_adapter
from sepme_adapter import Eraser, EraserFileError
from sepme_adapter.formats import read_safetensors

from .helpers import CONCEPTS, make_eraser, unet_output

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    from sepme_adapter.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("good")
    return make_eraser(tiny_pipeline(), "vangogh").save(folder / "vangogh.safetensors")


@FUZZ
@given(header=st.dictionaries(st.sampled_from(["format", "format_version", "name", "prompt", "kind", "beta",
                                               "known", "protected", "metadata", "text_width", "junk"]),
                              st.one_of(st.text(max_size=30), st.sampled_from(
                                  ["sepme-eraser", "1", "separable", "dense", "{}", "[]", "1e-4", "nan",
                                   "-inf", "null", '{"a": 1}', "64"]))))
def test_fuzzed_metadata_is_refused_cleanly_or_loads_validated(good_file, tmp_path_factory, header):
    tensors, _ = read_safetensors(good_file)
    path = tmp_path_factory.mktemp("fuzz") / "e.safetensors"
    save_file(tensors, str(path), metadata=header)
    try:
        eraser = Eraser.load(path)
    except EraserFileError:
        return
    eraser.validate()  # whatever loads is a valid eraser


@FUZZ
@given(position=st.integers(min_value=0, max_value=4000), value=st.integers(min_value=0, max_value=255),
       cut=st.integers(min_value=0, max_value=4000))
def test_corrupted_bytes_are_refused_with_the_file_name(good_file, tmp_path_factory, position, value, cut):
    data = bytearray(good_file.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[min(position, header_end - 1)] = value  # corrupt the header region
    data = data[: max(len(data) - cut, 0)] if cut % 3 == 0 else data
    path = tmp_path_factory.mktemp("corrupt") / "bad.safetensors"
    path.write_bytes(bytes(data))
    try:
        eraser = Eraser.load(path)
    except EraserFileError as error:
        assert "bad.safetensors" in str(error)
        return
    eraser.validate()


def test_a_huge_header_claim_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(EraserFileError, match="header claims"):
        Eraser.load(path)


def test_wrong_dtype_tensors_are_refused(good_file, tmp_path):
    tensors, header = read_safetensors(good_file)
    tensors["basis"] = tensors["basis"].to(torch.int32)
    save_file(tensors, str(tmp_path / "int.safetensors"), metadata=header)
    with pytest.raises(EraserFileError, match="floating-point"):
        Eraser.load(tmp_path / "int.safetensors")


def test_a_hub_weight_name_cannot_escape_the_repository(pipe):
    for name in ("../../etc/passwd.safetensors", "/abs/e.safetensors", "a/../../b.safetensors"):
        with pytest.raises(ValueError, match="relative path"):
            pipe.load_sepme("org/repo", weight_name=name)


def test_a_failed_load_changes_nothing_already_loaded(pipe, good_file, tmp_path):
    pipe.load_sepme(make_eraser(pipe, "picasso"))
    before = unet_output(pipe)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!" * 4)
    with pytest.raises(EraserFileError):
        pipe.load_sepme(tmp_path / "bad.safetensors")
    assert pipe.get_erased() == ["picasso"] and torch.equal(unet_output(pipe), before)


def test_generation_while_another_thread_toggles_sees_one_consistent_state_per_unet_call(pipe):
    pipe.load_sepme(make_eraser(pipe, "vangogh", scale=20000.0))
    erased = unet_output(pipe)
    pipe.set_erased([])
    original = unet_output(pipe)
    stop = threading.Event()
    toggles = []

    def toggle():
        while not stop.is_set():
            pipe.set_erased(["vangogh"])
            time.sleep(1e-4)  # let the generating thread in: a spinning toggler starves it of the GIL
            pipe.set_erased([])
            toggles.append(1)

    thread = threading.Thread(target=toggle)
    thread.start()
    try:
        outputs = [unet_output(pipe) for _ in range(12)]
    finally:
        stop.set()
        thread.join()
    assert len(toggles) > len(outputs)  # the state really changed while the UNet ran
    for out in outputs:  # each call ran wholly erased or wholly original, never a mix of layers
        assert torch.equal(out, erased) or torch.equal(out, original)


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
import sepme_adapter
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.training import TrainConfig, train_erasers
pipe = sepme_adapter.attach(tiny_pipeline())
config = TrainConfig(images_per_concept=2, reference_steps=2, lr=0.1, beta=0.1, max_iterations=int(sys.argv[3]),
                     warmup=1000, checkpoint_every=1)
erasers = train_erasers(pipe, {concepts!r}, config=config, cache_dir=sys.argv[1], checkpoint_dir=sys.argv[2],
                        resume=sys.argv[4] == "resume", progress=False)
for e in erasers:
    e.save(sys.argv[2] + "/" + e.name + ".safetensors")
"""


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_to_the_same_result(tmp_path):
    concepts = [f"{n}={p}" for n, p in list(CONCEPTS.items())[:2]]
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(concepts=concepts))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(folder, iterations, resume, kill_after=None):
        process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ref"), str(folder),
                                    str(iterations), "resume" if resume else "fresh"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kill_after is None:
            assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]
            return
        checkpoint = folder / "group-0" / "checkpoint.safetensors"
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            if checkpoint.exists():
                state = json.loads(read_safetensors(checkpoint)[1]["sepme_checkpoint"])
                if state["tracks"][0]["steps"] >= kill_after:
                    break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()

    run(tmp_path / "whole", 16, resume=False)
    run(tmp_path / "killed", 16, resume=False, kill_after=5)
    assert not (tmp_path / "killed" / "vangogh.safetensors").exists()  # it really died mid-run
    run(tmp_path / "killed", 16, resume=True)
    for name in ("vangogh", "picasso"):
        whole = Eraser.load(tmp_path / "whole" / f"{name}.safetensors")
        resumed = Eraser.load(tmp_path / "killed" / f"{name}.safetensors")
        assert whole.metadata["history"]["l_cor"] == pytest.approx(resumed.metadata["history"]["l_cor"], rel=1e-5)
        for layer in whole.weights:
            assert torch.allclose(whole.weights[layer], resumed.weights[layer], atol=1e-6)


def test_state_errors_are_typed_and_say_what_to_do(pipe):
    with pytest.raises(sepme_adapter.SepMEStateError, match="load_sepme"):
        pipe.fuse_sepme()
    with pytest.raises(sepme_adapter.SepMEStateError, match="fuse_sepme"):
        pipe.unfuse_sepme()
    assert issubclass(sepme_adapter.EmptyNullSpaceError, sepme_adapter.SepMEError)
