"""kernels/dispatch.py: every module in TRITON_MODULES imports and defines its op with the
reference op's arguments; a broken registration (a renamed kernel file, a module that fails to
import, an op missing from its module) is an ImportError naming the module, never a silent fall
back to torch; the per-sample routing ops run the reference op off CUDA and the Triton op on CUDA
or when forced.
"""

import importlib
import inspect
import sys

import pytest
import torch

from recpeft.kernels import AdapterWeights, Backend, bag_layout, dispatch, reference, resolve_backend

REGISTERED = sorted(dispatch.TRITON_MODULES.items())
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _linear_args(m=5, k=4, n=3, r=2):
    return torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(r, k), torch.randn(n, r), 0.5


@pytest.fixture
def fake_cuda(monkeypatch):
    """Tensors report is_cuda, so that dispatch's automatic choice is Triton (the case a broken
    registration used to hide by falling back to torch)."""
    if not dispatch.TRITON_INSTALLED:
        pytest.skip("the automatic choice is Triton only where triton is installed")
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op_name,module_name", REGISTERED)
def test_every_registered_module_imports_and_defines_its_op(op_name, module_name):
    module = importlib.import_module(f"recpeft.kernels.{module_name}")
    op = getattr(module, op_name, None)
    assert callable(op), f"recpeft.kernels.{module_name} defines no function {op_name!r}"
    assert dispatch.triton_op(op_name) is op
    # dispatch passes the reference op's positional arguments, in order: the Triton op takes them
    expected = [
        p.name for p in inspect.signature(getattr(reference, op_name)).parameters.values() if p.kind in POSITIONAL
    ]
    got = [p.name for p in inspect.signature(op).parameters.values() if p.kind in POSITIONAL]
    assert got[: len(expected)] == expected
    assert callable(getattr(dispatch, op_name)), f"dispatch has no entry point {op_name!r}"


def test_every_op_has_its_triton_module():
    assert dispatch.TRITON_MODULES == {
        "lora_linear": "lora_linear",
        "lora_embedding_bag": "lora_embedding_bag",
        **dict.fromkeys(
            [
                "segmented_lora_linear",
                "segmented_lora_linear_stacked",
                "segmented_lora_bag_delta",
                "segmented_lora_bag_stacked",
            ],
            "segmented_lora",
        ),
    }
    assert dispatch.triton_op("no_such_op") is None
    assert dispatch.uses_triton("segmented_lora_linear", torch.zeros(1), backend="triton")


def test_a_registered_module_that_does_not_exist_is_an_error(monkeypatch):
    monkeypatch.setitem(dispatch.TRITON_MODULES, "lora_linear", "no_such_kernel_file")
    with pytest.raises(
        ImportError,
        match=r"recpeft\.kernels\.no_such_kernel_file, the Triton module registered "
        r"for op 'lora_linear'.*does not import",
    ) as caught:
        dispatch.triton_op("lora_linear")
    assert caught.value.name == "recpeft.kernels.no_such_kernel_file"
    args = _linear_args()
    with pytest.raises(ImportError, match="no_such_kernel_file"):
        dispatch.lora_linear(*args, backend="triton")
    with pytest.raises(ImportError, match="no_such_kernel_file"):
        dispatch.uses_triton("lora_linear", args[0], backend="triton")
    assert dispatch.lora_linear(*args, backend="torch").shape == (5, 3)  # the torch backend needs no module


def test_a_broken_registration_is_an_error_on_cuda_too(monkeypatch, fake_cuda):
    """The automatic choice (CUDA tensors → Triton) raises as well: no silent torch fall back."""
    monkeypatch.setitem(dispatch.TRITON_MODULES, "lora_linear", "no_such_kernel_file")
    args = _linear_args()
    assert resolve_backend(args[0]) is Backend.TRITON
    with pytest.raises(ImportError, match="no_such_kernel_file"):
        dispatch.lora_linear(*args)


def test_a_registered_module_that_fails_to_import_is_an_error(monkeypatch):
    """A kernel file whose own imports fail (None in sys.modules makes any import of it fail)."""
    monkeypatch.setitem(sys.modules, "recpeft.kernels.lora_embedding_bag", None)
    with pytest.raises(ImportError, match=r"recpeft\.kernels\.lora_embedding_bag, the Triton module"):
        dispatch.triton_op("lora_embedding_bag")


def test_a_registered_module_without_its_op_is_an_error(monkeypatch):
    monkeypatch.setitem(dispatch.TRITON_MODULES, "lora_linear", "bags")  # imports, has no lora_linear
    with pytest.raises(
        ImportError,
        match=r"recpeft\.kernels\.bags, registered for op 'lora_linear'.*defines no "
        r"function 'lora_linear'",
    ):
        dispatch.triton_op("lora_linear")


def test_unknown_backend_is_refused(monkeypatch):
    args = _linear_args()
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*use one of: torch, triton"):
        dispatch.lora_linear(*args, backend="cuda")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        dispatch.lora_linear(*args)


# ---------------------------------------------------------------------------------------------
# Per-sample routing ops: the reference op off CUDA, the Triton op on CUDA or when forced
# ---------------------------------------------------------------------------------------------


def _routed_linear_case():
    x, weight, bias, lora_A, lora_B, scale = _linear_args(m=6)
    adapters = [AdapterWeights(lora_A, lora_B, scale), None]
    return x, weight, bias, adapters, torch.tensor([0, 1, -1, 0, 1, 0])


def _routed_bag_case():
    lora_A, lora_B = torch.randn(10, 2), torch.randn(2, 3)
    layout = bag_layout(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 2, 4]), num_embeddings=10)
    bag_adapter = torch.tensor([0, -1, 0, 1])
    return layout, [AdapterWeights(lora_A, lora_B, 2.0), None], bag_adapter, 3, torch.float32


ROUTED = {"segmented_lora_linear": _routed_linear_case, "segmented_lora_bag_delta": _routed_bag_case}


@pytest.mark.parametrize("name", list(ROUTED))
def test_routing_ops_run_the_reference_op_off_cuda(name, monkeypatch):
    args = ROUTED[name]()
    expected = getattr(reference, name)(*args)
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    assert torch.equal(getattr(dispatch, name)(*args), expected)
    assert torch.equal(getattr(dispatch, name)(*args, backend="torch"), expected)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    assert torch.equal(getattr(dispatch, name)(*args), expected)


def _spy_on_triton_op(name, monkeypatch) -> list:
    calls = []
    module = sys.modules[dispatch.triton_op(name).__module__]
    monkeypatch.setattr(module, name, lambda *a: calls.append(a) or "triton")
    return calls


@pytest.mark.parametrize("name", list(ROUTED))
def test_routing_ops_run_the_triton_op_on_cuda(name, monkeypatch, fake_cuda):
    args = ROUTED[name]()
    calls = _spy_on_triton_op(name, monkeypatch)
    assert getattr(dispatch, name)(*args) == "triton"
    assert len(calls) == 1 and calls[0][0] is args[0]


@pytest.mark.parametrize("name", list(ROUTED))
def test_forcing_triton_runs_the_triton_op_of_a_routing_op(name, monkeypatch):
    args = ROUTED[name]()
    calls = _spy_on_triton_op(name, monkeypatch)
    assert getattr(dispatch, name)(*args, backend="triton") == "triton"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    assert getattr(dispatch, name)(*args) == "triton"
    assert len(calls) == 2


def test_a_kernel_that_fails_to_build_is_one_error_naming_op_shapes_and_the_way_around(monkeypatch):
    """No silent fall back: a Triton compile/launch error becomes one RuntimeError that says which
    op, on which operands, and that RECPEFT_BACKEND=torch runs the PyTorch ops; other errors pass."""
    out_of_resources = type("OutOfResources", (Exception,), {"__module__": "triton.runtime.errors"})
    module = sys.modules[dispatch.triton_op("lora_linear").__module__]

    def broken(*args):
        raise out_of_resources("out of resource: shared memory, Required: 245760, Hardware limit: 232448")

    monkeypatch.setattr(module, "lora_linear", broken)
    x, w, a, b = torch.randn(6, 4), torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2)
    with pytest.raises(RuntimeError) as caught:
        dispatch.lora_linear(x, w, None, a, b, 1.0, backend="triton")
    message = str(caught.value)
    assert "\n" not in message
    for words in ("recpeft.kernels lora_linear", "[6, 4] float32 cpu", "[3, 2] float32", "OutOfResources"):
        assert words in message, message
    assert message.endswith("set RECPEFT_BACKEND=torch to run the PyTorch ops instead")

    def wrong_input(*args):
        raise ValueError("x must be 2-D")

    monkeypatch.setattr(module, "lora_linear", wrong_input)
    with pytest.raises(ValueError, match="x must be 2-D"):  # not a kernel failure: unchanged
        dispatch.lora_linear(x, w, None, a, b, 1.0, backend="triton")


def test_a_backward_kernel_that_fails_is_named_too(monkeypatch):
    """The error comes from inside autograd's backward, after the forward returned: the op's
    Function names it as the op's backward, with the operands and the way around it."""
    out_of_resources = type("OutOfResources", (Exception,), {"__module__": "triton.runtime.errors"})
    module = sys.modules[dispatch.triton_op("lora_linear").__module__]

    def broken(*args, **kwargs):
        raise out_of_resources("out of resource: shared memory, Required: 245760, Hardware limit: 232448")

    monkeypatch.setattr(module, "lora_linear_backward", broken)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    a = torch.randn(2, 4, generator=g).requires_grad_()
    b = torch.randn(3, 2, generator=g).requires_grad_()
    y = dispatch.lora_linear(x, w, None, a, b, 1.0, backend="triton")  # the forward runs
    with pytest.raises(RuntimeError) as caught:
        y.sum().backward()
    message = str(caught.value)
    assert "\n" not in message and "recpeft.kernels lora_linear backward" in message, message
    assert "[6, 4] float32 cpu" in message and "OutOfResources" in message
    assert message.endswith("set RECPEFT_BACKEND=torch to run the PyTorch ops instead")
