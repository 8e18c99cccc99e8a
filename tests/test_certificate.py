"""The leakage certificate: the largest relative K/V change an eraser causes on the prompts it keeps."""

import torch

from sepme_adapter import Eraser
from sepme_adapter.basis import compact_basis
from sepme_adapter.certificate import certify, leakage_certificate
from sepme_adapter.text import encode_prompts
from sepme_adapter.unet import layer_weight

from .helpers import CONCEPTS, PROTECTED, make_eraser


def direct_certificate(pipe, eraser):
    """The definition, one prompt and one layer at a time, in float64."""
    worst = 0.0
    for prompt in ["", *(p for ps in eraser.known.values() for p in ps), *eraser.protected]:
        c = encode_prompts(pipe, [prompt])[0].double()
        for layer in eraser.weights:
            weight = layer_weight(pipe.unet, layer).detach().double()
            change = (c @ eraser.delta(layer).double().T).norm() / (c @ weight.T).norm()
            worst = max(worst, float(change))
    return worst


def test_the_certificate_matches_a_direct_computation_and_is_round_off_for_an_exact_basis(pipe):
    eraser = make_eraser(pipe, "vangogh")
    record = leakage_certificate(pipe, eraser)
    assert record["prompts"] == 1 + 2 + len(PROTECTED)
    assert abs(record["max_leakage"] - direct_certificate(pipe, eraser)) <= 1e-9 * record["max_leakage"]
    assert record["max_leakage"] <= 1e-5  # exact null space (Eq. 8)
    certify(pipe, eraser)
    assert eraser.certificate == record["max_leakage"]


def test_a_compact_basis_gets_a_measured_nonzero_certificate_that_travels_with_the_file(pipe, tmp_path):
    exact = make_eraser(pipe, "vangogh")
    known = exact.excluded_prompts
    basis, _ = compact_basis(list(encode_prompts(pipe, known)), max_leakage=1e-2)
    generator = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(w.shape[0], basis.shape[1], generator=generator) * 2000.0
               for k, w in exact.weights.items()}
    eraser = certify(pipe, Eraser(name="vangogh", prompt=CONCEPTS["vangogh"], basis=basis, weights=weights,
                                  known=exact.known, protected=exact.protected, metadata=dict(exact.metadata)))
    assert eraser.certificate > 1e-5  # a compact basis is not exact: its price is measured, not assumed
    assert abs(eraser.certificate - direct_certificate(pipe, eraser)) <= 1e-9 * eraser.certificate
    loaded = Eraser.load(eraser.save(tmp_path / "vangogh.safetensors"))
    assert loaded.certificate == eraser.certificate
    pipe.load_sepme(loaded, erase=False)
    assert pipe.list_sepme()["vangogh"]["certificate"] == eraser.certificate


def test_verify_rechecks_the_certificate_and_honours_a_user_threshold(pipe):
    from sepme_adapter.verify import verify_eraser

    exact = make_eraser(pipe, "vangogh")
    basis, _ = compact_basis(list(encode_prompts(pipe, exact.excluded_prompts)), max_leakage=1e-2)
    generator = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(w.shape[0], basis.shape[1], generator=generator) * 2000.0
               for k, w in exact.weights.items()}
    eraser = certify(pipe, Eraser(name="vangogh", prompt=CONCEPTS["vangogh"], basis=basis, weights=weights,
                                  known=exact.known, protected=exact.protected,
                                  metadata={**exact.metadata, "basis": {"kind": "compact"}}))
    assert verify_eraser(pipe, eraser)["ok"]  # a compact basis leaks by design: judged by its certificate
    strict = verify_eraser(pipe, eraser, max_leakage=eraser.certificate / 2)
    assert not strict["ok"] and "max-leakage" in " ".join(strict["problems"])
    eraser.metadata["certificate"]["max_leakage"] = eraser.certificate / 10  # a file claiming too little
    assert "does not hold" in " ".join(verify_eraser(pipe, eraser)["problems"])
