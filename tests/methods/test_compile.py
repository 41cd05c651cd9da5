"""``--model.compile true``: compiled backbones equal eager, keep their parameter names, fall back."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

from xcit_ssl.methods import compiling
from xcit_ssl.models import create_backbone


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("xcit_nano_12_p8_224", num_classes=0, depth=2, img_size=32, drop_path_rate=0.0)


@pytest.mark.slow  # inductor compiles C++ on the CPU: about a minute here
def test_compiled_backbone_equals_eager_outputs_and_gradients_at_two_resolutions() -> None:
    eager = _tiny()
    compiled = copy.deepcopy(eager)
    assert compiling.compile_backbones({"student_backbone": compiled})
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix
    for size in (32, 16):  # a global and a local crop size: one graph each
        x = torch.randn(4, 3, size, size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out_e, out_c = eager(x), compiled(x)
        # the compile-time hooks stay out of the graph: no graph break, no Dynamo warning for the user
        assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message)[:200] for w in caught]
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
        # float sums in another order: compared with the largest gradient of the network (a tiny
        # gradient made of large cancelling terms, such as the CLS token's, carries their rounding)
        scale = max(float(p.grad.abs().max()) for p in eager.parameters())
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            assert float((q.grad - p.grad).abs().max()) <= 1e-4 * scale, (name, size, scale)
            p.grad, q.grad = None, None


def test_compile_falls_back_to_eager_with_one_message(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(compiling, "compile_unavailable_reason", lambda: "TorchDynamo does not support this Python")
    model = _tiny()
    with caplog.at_level(logging.WARNING, logger="xcit_ssl.methods.compiling"):
        assert compiling.compile_backbones({"student_backbone": model}) is False
    assert [r.getMessage() for r in caplog.records] == [
        "--model.compile true: TorchDynamo does not support this Python; training runs eagerly"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), _tiny()(x))  # untouched


def test_dino_compile_flag_compiles_both_backbones_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from xcit_ssl.config import DINOConfig
    from xcit_ssl.methods.dino import DINO

    calls = []
    monkeypatch.setattr(compiling, "compile_backbones", lambda modules, mode=None: calls.append(sorted(modules)) or True)
    dino = DINO(_tiny(), DINOConfig(out_dim=16, hidden_dim=8, bottleneck_dim=4), compile=True)
    dino.configure_model()
    dino.configure_model()  # Lightning may call it again (e.g. on resume): compile once
    assert calls == [["student_backbone", "teacher_backbone"]]
    assert dino.hparams["compile"] is True
