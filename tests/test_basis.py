"""The null-space basis S_p (paper Eq. 8)."""

import pytest
import torch

from sepme_adapter import EmptyNullSpaceError, null_space_basis
from sepme_adapter.basis import DEFAULT_MAX_LEAKAGE, choose_basis, compact_basis, reach


def test_basis_is_orthonormal_and_annihilates_every_stacked_prompt():
    torch.manual_seed(0)
    prompts = [torch.randn(77, 768) for _ in range(3)]
    basis = null_space_basis(prompts)
    assert basis.shape == (768, 768 - 3 * 77)
    gram = basis.double().T @ basis.double()
    assert torch.allclose(gram, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-6)
    for prompt in prompts:
        assert (prompt.double() @ basis.double()).abs().max() < 1e-4


def test_a_list_and_a_stacked_tensor_give_the_same_space():
    torch.manual_seed(1)
    prompts = [torch.randn(8, 64), torch.randn(8, 64)]
    a = null_space_basis(prompts).double()
    b = null_space_basis(torch.stack(prompts)).double()
    assert torch.allclose(a @ a.T, b @ b.T, atol=1e-6)  # same projector


def test_rank_deficient_embeddings_keep_the_larger_null_space():
    torch.manual_seed(2)
    low_rank = torch.randn(20, 3) @ torch.randn(3, 32)
    assert null_space_basis(low_rank).shape == (32, 29)


def test_the_rank_tolerance_is_exposed():
    torch.manual_seed(3)
    u = torch.linalg.qr(torch.randn(16, 16))[0]
    matrix = u[:, :4] @ torch.diag(torch.tensor([1.0, 0.5, 1e-3, 1e-7])) @ u[:, :4].T
    assert null_space_basis(matrix).shape[1] == 13  # 1e-7 is round-off
    assert null_space_basis(matrix, rtol=1e-2).shape[1] == 14


def test_an_empty_null_space_says_rows_width_rank_and_what_to_do():
    torch.manual_seed(4)
    with pytest.raises(EmptyNullSpaceError, match=r"24 x 16 .* rank 16.*fewer known"):
        null_space_basis([torch.randn(8, 16) for _ in range(3)])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        null_space_basis([])
    with pytest.raises(ValueError, match="same width"):
        null_space_basis([torch.randn(2, 8), torch.randn(2, 9)])


# ------------------------------------------------------------------ the compact basis
def anisotropic_prompts(count: int, rows: int = 8, width: int = 64, seed: int = 5) -> list[torch.Tensor]:
    """Prompt embeddings whose energy decays over directions, as text encoders' do."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=generator) * torch.logspace(0, -3, width).unsqueeze(1)
    return [torch.randn(rows, width, generator=generator) @ mix for _ in range(count)]


def test_the_compact_basis_keeps_every_known_prompt_within_its_returned_bound():
    prompts = anisotropic_prompts(10)  # 80 rows in 64 dimensions: no exact null space
    with pytest.raises(EmptyNullSpaceError):
        null_space_basis(prompts)
    basis, bound = compact_basis(prompts, max_leakage=1e-2)
    assert basis.shape[1] > 0 and bound <= 1e-2
    gram = basis.double().T @ basis.double()
    assert torch.allclose(gram, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-6)
    shares = [float((p.double() @ basis.double()).norm() / p.double().norm()) for p in prompts]
    assert max(shares) <= bound * (1 + 1e-6)
    assert max(shares) == pytest.approx(bound, rel=1e-4)  # the bound is the measured maximum, not a guess
    smaller, tighter = compact_basis(prompts, max_leakage=1e-3)
    assert smaller.shape[1] < basis.shape[1] and tighter <= 1e-3  # capacity traded for leakage


def test_the_compact_basis_contains_the_exact_null_space():
    prompts = anisotropic_prompts(3)  # 24 rows in 64 dimensions
    exact = null_space_basis(prompts).double()
    compact, _ = compact_basis(prompts, max_leakage=1e-3)
    projector = compact.double() @ compact.double().T
    assert torch.allclose(projector @ exact, exact, atol=1e-6)


def test_choose_basis_uses_the_exact_space_while_it_has_room_then_the_compact_one():
    few, many = anisotropic_prompts(2), anisotropic_prompts(10)
    choice = choose_basis(few)
    assert choice.kind == "exact" and choice.bound == 0.0
    choice = choose_basis(many)
    assert choice.kind == "compact" and 0 < choice.bound <= DEFAULT_MAX_LEAKAGE
    assert choose_basis(many, max_leakage=1e-2).basis.shape[1] > choice.basis.shape[1]
    with pytest.raises(EmptyNullSpaceError):
        choose_basis(many, max_leakage=0)  # exact only


def test_the_automatic_compact_basis_loosens_until_the_concept_keeps_its_reach():
    known = anisotropic_prompts(10)  # no exact null space
    concept = anisotropic_prompts(1, seed=9)[0]
    tight = choose_basis(known)  # without a concept: the tightest level
    assert tight.kind == "compact" and tight.bound <= 1e-3
    chosen = choose_basis(known, concept=concept)
    loosest = compact_basis(known, 1e-2)[0]
    assert tight.bound <= chosen.bound <= 1e-2
    assert reach(concept, chosen.basis) >= 0.5 * reach(concept, loosest) - 1e-12
