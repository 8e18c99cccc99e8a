"""The null-space basis S_p (paper Eq. 8)."""

import pytest
import torch

from sepme_adapter import EmptyNullSpaceError, null_space_basis


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
