"""The seed notebook's shape checks, run unchanged against cvtlab's versions of its blocks."""

import torch

import cvtlab
from cvtlab.models.seed import EmbeddingBlock, TransformerBlock


def test_notebook_block_shape_check():
    input = torch.randn(2, 3, 64, 64)
    excepted_output_shape = (2, 256, 64)

    embedding_block = EmbeddingBlock()
    transformer_block = TransformerBlock()

    output = embedding_block(input)
    output = transformer_block(output)

    assert output.shape == excepted_output_shape


def test_notebook_model_shape_check():
    model = cvtlab.create_model("cvt_seed")
    dummy_input = torch.randn(8, 3, 64, 64)
    output = model(dummy_input)
    assert output.shape == (8, 200)


def test_seed_trains_one_step_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = cvtlab.create_model("cvt_seed", num_classes=10)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_seed_block_keeps_the_residual_on_the_unprojected_input():
    # With attention and MLP outputs zeroed, the block must return its input unchanged.
    block = TransformerBlock().eval()
    torch.nn.init.zeros_(block.attn.out_proj.weight)
    torch.nn.init.zeros_(block.attn.out_proj.bias)
    torch.nn.init.zeros_(block.mlp[3].weight)
    torch.nn.init.zeros_(block.mlp[3].bias)
    x = torch.randn(2, 256, 64)
    assert torch.equal(block(x), x)
