"""``xcit-ssl export``: exports load strictly in timm, in the official XCiT module tree (official and
DINO layouts) and in our loader with the checkpoint's features, pt2/ONNX/TorchScript match the eager model, bad input is refused with exit code 2, and a
DINO run started from an export begins with the exported features.

The checkpoint is a real one: a tiny DINO fitted for two steps by Lightning and saved by the
trainer, so its teacher differs from its student and BatchNorm statistics are not the defaults.
"""

from __future__ import annotations

import hashlib
import json
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import timm
import timm.models.xcit as timm_xcit
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

import xcit_ssl
from xcit_ssl.export import backbone as export_mod
from xcit_ssl.cli import main
from xcit_ssl.config import DINOConfig, OptimConfig
from xcit_ssl.errors import UserError
from xcit_ssl.evaluation.knn import knn_evaluate
from xcit_ssl.export import export_backbone
from xcit_ssl.methods.dino import DINO
from xcit_ssl.models import build_backbone

NAME = "xcit_nano_12_p8_224"
TINY = dict(depth=1, embed_dim=32, num_heads=2)
SIZE = 32


class Views(Dataset):
    """2 global [3, 32, 32] + 2 local [3, 16, 16] seeded views per index."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return [torch.randn(3, s, s, generator=g) for s in (SIZE, SIZE, 16, 16)], 0


def _dino(pretrained: str | None = None, **backbone_kw) -> DINO:
    backbone = build_backbone(NAME, img_size=SIZE, **TINY, **backbone_kw)
    dino = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, momentum_teacher=0.5)
    return DINO(backbone, dino=dino, optim=OptimConfig(base_lr=1e-2, warmup_epochs=0), pretrained=pretrained)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: a second intra-op thread only adds synchronisation stalls on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DINO]:
    """(runs/tiny/checkpoints/last.ckpt, the fitted module)."""
    root = tmp_path_factory.mktemp("runs") / "tiny"
    torch.manual_seed(0)
    module = _dino()
    trainer = L.Trainer(
        default_root_dir=str(root), accelerator="cpu", devices=1, max_steps=2, max_epochs=1, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(Views(), batch_size=4))
    ckpt = root / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, module.eval()


@pytest.fixture(scope="module")
def exported(run: tuple[Path, DINO], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "backbone.safetensors"
    export_backbone(run[0], out)
    return out


def _images(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["xcit_ssl"])


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_safetensors_loads_strictly_in_timm_with_the_teachers_features(run, exported) -> None:
    _, module = run
    meta = _metadata(exported)
    model = timm.create_model(meta["name"], pretrained=False, num_classes=0, **meta["overrides"])
    model.load_state_dict(load_file(str(exported)), strict=True)
    x = _images(3, 3, SIZE, SIZE)
    assert not any(k.startswith("head") for k in load_file(str(exported)))
    torch.testing.assert_close(_features(model, x), module.embed(x), atol=1e-5, rtol=1e-5)
    # the teacher, not the student: after two EMA steps at momentum 0.5 they differ
    assert (_features(module.student_backbone, x) - module.embed(x)).abs().max() > 1e-3


def test_load_backbone_gives_the_checkpoints_features(run, exported) -> None:
    _, module = run
    model = xcit_ssl.load_backbone(exported)
    assert model.num_classes == 0 and model.variant_name == NAME
    x = _images(2, 3, 48, 64)  # any multiple of the patch size
    torch.testing.assert_close(_features(model, x), module.embed(x), atol=1e-6, rtol=1e-6)


def test_metadata_describes_the_backbone_and_its_source(run, exported) -> None:
    ckpt, _ = run
    meta = _metadata(exported)
    assert meta["name"] == NAME and meta["overrides"] == TINY
    assert meta["img_size"] == SIZE and meta["method"] == "dino" and meta["checkpoint_key"] == "teacher"
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["knn"] is None  # no `xcit-ssl knn` result next to this run


def test_student_on_request(run, tmp_path) -> None:
    ckpt, module = run
    report = export_backbone(ckpt, tmp_path / "student.safetensors", checkpoint_key="student")
    assert report.checkpoint_key == "student" and report.max_abs_diff == 0.0
    x = _images(2, 3, SIZE, SIZE)
    got = _features(xcit_ssl.load_backbone(report.out), x)
    torch.testing.assert_close(got, _features(module.student_backbone, x), atol=1e-6, rtol=1e-6)


def test_knn_result_of_the_same_weights_is_included(run, tmp_path) -> None:
    ckpt, _ = run
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 8, generator=g), torch.randn(10, 8, generator=g)
    result = knn_evaluate(train, torch.arange(40) % 4, test, torch.arange(10) % 4, ks=[10, 20], backend="torch")
    eval_dir = ckpt.parent.parent / "eval"
    eval_dir.mkdir(exist_ok=True)

    def write(name: str, sha256: str, key: str) -> None:
        record = {"command": "knn", "protocol": name.split("_last")[0], "created": "2026-01-01T00:00:00+00:00",
                  "weights": {"sha256": sha256, "checkpoint_key": key}, **result.as_dict(),
                  "data": {"dataset": "imagefolder", "root": "/data/toy4", "train_split": "train", "val_split": "val"}}  # fmt: skip
        (eval_dir / f"{name}.json").write_text(json.dumps(record))

    write("knn_fmnist_last", sha, "teacher")
    write("knn_imagenet_last", "0" * 64, "teacher")  # other weights
    write("knn_other_last", sha, "student")  # the student's accuracy says nothing about the teacher
    (eval_dir / "notes.json").write_text("not json")
    try:
        meta = export_backbone(ckpt, tmp_path / "b.safetensors").metadata
    finally:
        for f in eval_dir.iterdir():
            f.unlink()
    knn = _metadata(tmp_path / "b.safetensors")["knn"]
    assert meta["knn"] == knn and [entry["protocol"] for entry in knn] == ["knn_fmnist"]
    (entry,) = knn
    assert entry["k"] == 20
    assert entry["top1"] == pytest.approx(result.top1[20])
    assert entry["top5"] == pytest.approx(result.top5[20])
    # what was measured, not only the protocol's name: the data set, its size and its classes
    assert entry["data"] == {"dataset": "imagefolder", "root": "/data/toy4", "train_split": "train",
                             "val_split": "val", "num_train": 40, "num_val": 10, "num_classes": 4}  # fmt: skip


def test_pth_is_a_plain_timm_state_dict_with_a_sidecar(run, tmp_path) -> None:
    ckpt, module = run
    report = export_backbone(ckpt, tmp_path / "backbone.pth")
    assert report.format == "pth" and report.sidecar == tmp_path / "backbone.pth.json"
    meta = json.loads(report.sidecar.read_text())
    model = timm.create_model(meta["name"], pretrained=False, num_classes=0, **meta["overrides"])
    model.load_state_dict(torch.load(report.out, weights_only=True), strict=True)
    x = _images(2, 3, SIZE, SIZE)
    torch.testing.assert_close(_features(model, x), module.embed(x), atol=1e-5, rtol=1e-5)
    # our loader reads the sidecar for the architecture (this test-sized one has no registry name)
    ours = xcit_ssl.load_backbone(report.out)
    assert ours.variant_name == NAME and ours.embed_dim == TINY["embed_dim"] and len(ours.blocks) == TINY["depth"]
    torch.testing.assert_close(_features(ours, x), module.embed(x), atol=1e-6, rtol=1e-6)
    # without it, the file alone does not say which variant it is: refused with the fix named
    report.sidecar.rename(tmp_path / "elsewhere.json")
    with pytest.raises(UserError, match=r"backbone\.pth"):
        xcit_ssl.load_backbone(report.out)


# -- layouts for tools that load with strict=False ------------------------------------------------


class _OfficialClassAttentionBlock(nn.Module):
    """facebookresearch/xcit's class-attention block: one fused qkv, only the CLS token queries."""

    def __init__(self, dim: int, heads: int, tokens_norm: bool) -> None:
        super().__init__()
        self.heads, self.tokens_norm = heads, tokens_norm
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = timm.layers.Mlp(dim, 4 * dim)
        self.gamma1, self.gamma2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        normed = self.norm1(x)
        q, k, v = self.attn.qkv(normed).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = ((q[:, :, :1] * k).sum(-1) * (c // self.heads) ** -0.5).softmax(-1)  # [B, heads, N]
        cls = self.attn.proj((weights.unsqueeze(2) @ v).transpose(1, 2).reshape(b, 1, c))
        x = x + self.gamma1 * torch.cat([cls, normed[:, 1:]], dim=1)
        x = self.norm2(x) if self.tokens_norm else torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        return x + torch.cat([self.gamma2 * self.mlp(x[:, :1]), x[:, 1:]], dim=1)


class OfficialXCiT(nn.Module):
    """The official XCiT module tree (``pos_embeder``, fused class-attention qkv), from timm's
    stem and XCA blocks; headless, returns the normalised CLS feature ``[B, D]``."""

    def __init__(self, patch_size: int, embed_dim: int, depth: int, num_heads: int, tokens_norm: bool) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = timm_xcit.ConvPatchEmbed(patch_size=patch_size, embed_dim=embed_dim)
        self.pos_embeder = timm_xcit.PositionalEncodingFourier(dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            timm_xcit.XCABlock(embed_dim, num_heads, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.cls_attn_blocks = nn.ModuleList(
            _OfficialClassAttentionBlock(embed_dim, num_heads, tokens_norm) for _ in range(2)
        )
        self.norm = norm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x, (hp, wp) = self.patch_embed(x)
        x = x + self.pos_embeder(b, hp, wp).reshape(b, -1, x.shape[1]).permute(0, 2, 1)
        for blk in self.blocks:
            x = blk(x, hp, wp)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def _official_model() -> OfficialXCiT:
    return OfficialXCiT(patch_size=8, tokens_norm=False, **TINY).eval()  # nano: CLS-only norm2


def test_official_layout_loads_strictly_into_the_official_model(run, exported, tmp_path) -> None:
    ckpt, module = run
    x = _images(2, 3, SIZE, SIZE + 16)
    out = tmp_path / "official.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--layout", "official"]) == 0
    assert _metadata(out)["layout"] == "official" and _metadata(exported)["layout"] == "timm"
    official = _official_model()
    official.load_state_dict(load_file(str(out)), strict=True)
    torch.testing.assert_close(_features(official, x), module.embed(x), atol=1e-5, rtol=0)
    # the timm layout in the same model, loaded as the official code does (strict=False): the
    # positional encoding and class attention stay at random, silently
    stale = _official_model()
    missing = stale.load_state_dict(load_file(str(exported)), strict=False).missing_keys
    assert {"pos_embeder.token_projection.weight", "cls_attn_blocks.0.attn.qkv.weight"} <= set(missing)
    assert (_features(stale, x) - module.embed(x)).abs().max() > 1e-2
    # and our loader reads the official layout back
    torch.testing.assert_close(_features(xcit_ssl.load_backbone(out), x), module.embed(x), atol=1e-6, rtol=0)


def test_dino_layout_reads_like_dinos_eval_tools(run, tmp_path) -> None:
    ckpt, module = run
    report = export_backbone(ckpt, tmp_path / "dino.pth", layout="dino")
    assert report.layout == "dino" and json.loads(report.sidecar.read_text())["layout"] == "dino"
    saved = torch.load(report.out, weights_only=True)
    assert list(saved) == ["teacher"] and all(k.startswith("backbone.") for k in saved["teacher"])
    # DINO's utils.load_pretrained_weights with --checkpoint_key teacher
    state = {k.replace("module.", "").replace("backbone.", ""): v for k, v in saved["teacher"].items()}
    official = _official_model()
    official.load_state_dict(state, strict=True)
    x = _images(2, 3, SIZE, SIZE)
    torch.testing.assert_close(_features(official, x), module.embed(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(_features(xcit_ssl.load_backbone(report.out), x), module.embed(x), atol=1e-6, rtol=0)


def test_layout_that_the_format_cannot_hold_is_refused(run, tmp_path) -> None:
    with pytest.raises(UserError, match=r"safetensors cannot hold: name the output dino\.pth"):
        export_backbone(run[0], tmp_path / "dino.safetensors", layout="dino")
    with pytest.raises(UserError, match="a onnx export has none: drop --layout"):
        export_backbone(run[0], tmp_path / "b.onnx", layout="official")
    with pytest.raises(UserError, match="unknown --layout 'mmpretrain'"):
        export_backbone(run[0], tmp_path / "b.pth", layout="mmpretrain")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load's deprecation notice
def test_torchscript_matches_eager_at_any_batch_and_size(run, tmp_path, capsys) -> None:
    ckpt, module = run
    out = tmp_path / "backbone.ts"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out
    extra = {"xcit_ssl.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["xcit_ssl.json"])["name"] == NAME
    for shape in [(3, 3, SIZE, SIZE), (1, 3, 64, 40)]:
        x = _images(*shape)
        assert (_features(scripted, x) - module.embed(x)).abs().max() <= 1e-4


def test_onnx_matches_eager_at_any_batch_and_size(run, tmp_path) -> None:
    import onnx  # in the dev extra that scripts/setup.sh installs
    import onnxruntime as ort
    ckpt, module = run
    report = export_backbone(ckpt, tmp_path / "backbone.onnx")
    assert report.max_abs_diff <= 1e-4 and report.checked_shapes[0] != report.checked_shapes[1]
    props = {p.key: p.value for p in onnx.load(str(report.out)).metadata_props}
    assert json.loads(props["xcit_ssl"])["source_sha256"] == report.metadata["source_sha256"]
    session = ort.InferenceSession(str(report.out), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, SIZE, SIZE), (2, 3, 24, 56)]:
        x = _images(*shape)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert (got - module.embed(x)).abs().max() <= 1e-4


def test_pt2_matches_eager_at_any_batch_and_size(run, tmp_path) -> None:
    """torch.export: batch, height and width are symbolic; the program runs without xcit-ssl."""
    ckpt, module = run
    report = export_backbone(ckpt, tmp_path / "backbone.pt2")
    assert report.format == "pt2" and report.max_abs_diff <= 1e-4 and report.sidecar == tmp_path / "backbone.pt2.json"
    extra = {"xcit_ssl.json": ""}
    program = torch.export.load(str(report.out), extra_files=extra).module()
    assert json.loads(extra["xcit_ssl.json"])["source_sha256"] == report.metadata["source_sha256"]
    for shape in [(3, 3, SIZE, SIZE), (1, 3, 64, 40)]:  # neither is a shape the export was traced with
        x = _images(*shape)
        with torch.no_grad():
            assert (program(x) - module.embed(x)).abs().max() <= 1e-4


def test_bare_overwrite_flag_and_a_suffix_that_names_no_format(run, tmp_path, capsys) -> None:
    ckpt, _ = run
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"old")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"]) == 0  # no value needed
    assert load_file(str(out))  # replaced by a real export
    # .bin says nothing of the format: refused, naming --format, and nothing is written
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "w.bin")]) == 2
    assert "--format" in capsys.readouterr().err and not (tmp_path / "w.bin").exists()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "w.bin"), "--format", "pth"]) == 0
    assert set(torch.load(tmp_path / "w.bin", weights_only=True)) == set(load_file(str(out)))


def test_existing_output_is_refused_unless_overwrite(run, exported, tmp_path) -> None:
    ckpt, _ = run
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        export_backbone(ckpt, out)
    assert out.read_bytes() == b"precious"
    export_backbone(ckpt, out, overwrite=True)
    # deterministic: same checkpoint, same tensors and metadata (not the same bytes: safetensors
    # writes its metadata map in hash order, so "format" and "xcit_ssl" may swap places)
    assert _metadata(out) == _metadata(exported)
    again, first = load_file(str(out)), load_file(str(exported))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]  # no temporary files left


def test_failed_check_writes_nothing(run, tmp_path, monkeypatch) -> None:
    ckpt, _ = run
    monkeypatch.setattr(export_mod, "TOLERANCE", -1.0)  # any difference (even 0) now fails the check
    with pytest.raises(UserError, match="nothing was written"):
        export_backbone(ckpt, tmp_path / "b.ts")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["not_a_checkpoint", "truncated", "other_variant", "unknown_format", "missing"])
def test_bad_input_gives_one_message_and_exit_code_2(run, tmp_path, capsys, case: str) -> None:
    ckpt, _ = run
    args = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "b.safetensors")]
    expected = {
        "not_a_checkpoint": "is not a checkpoint", "truncated": "truncated or corrupt",
        "other_variant": "xcit_small_12_p16_224", "unknown_format": "unknown export format 'tflite'",
        "missing": "checkpoint not found",
    }[case]  # fmt: skip
    if case == "not_a_checkpoint":
        (tmp_path / "notes.txt").write_text("hello")
        args[1] = str(tmp_path / "notes.txt")
    elif case == "truncated":
        data = ckpt.read_bytes()
        (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
        args[1] = str(tmp_path / "cut.ckpt")
    elif case == "other_variant":
        args += ["--backbone", "xcit_small_12_p16_224"]
    elif case == "unknown_format":
        args += ["--format", "tflite"]
    else:
        args[1] = str(tmp_path / "nope.ckpt")
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err
    problems = [ln for ln in err.splitlines() if not ln.startswith("INFO ")]  # info lines may precede it
    assert len(problems) == 1 and problems[0].startswith("xcit-ssl export: error:"), err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "b.safetensors").exists()


def test_name_without_known_suffix_needs_format(run, tmp_path) -> None:
    with pytest.raises(UserError, match="cannot tell the export format"):
        export_backbone(run[0], tmp_path / "backbone.weights")
    with pytest.raises(UserError, match="does not match the file name"):
        export_backbone(run[0], tmp_path / "backbone.safetensors", format="onnx")


def test_dino_started_from_an_export_has_the_exported_features(exported) -> None:
    reference = xcit_ssl.load_backbone(exported)
    x = _images(2, 3, SIZE, SIZE)
    want = _features(reference, x)
    head = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    for module in (
        _dino(pretrained=str(exported)),  # --model.pretrained FILE
        DINO(build_backbone(NAME, pretrained=str(exported), **TINY), dino=head),  # --model.backbone.init_args...
    ):
        # the same weights: equal to rounding (torch 2.11 differs from 2.14 by 6e-8 here; other weights by >> 1e-3)
        torch.testing.assert_close(module.embed(x), want, atol=1e-6, rtol=0)  # the teacher
        torch.testing.assert_close(_features(module.student_backbone, x), want, atol=1e-6, rtol=0)


def test_dino_refuses_an_export_of_another_variant(exported) -> None:
    with pytest.raises(UserError, match="D=32, depth=1"):
        DINO(build_backbone(NAME, depth=2, embed_dim=32, num_heads=2), pretrained=str(exported))


def test_recipe_accepts_model_pretrained(exported, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["xcit-ssl"])  # run_fit rewrites sys.argv for Lightning's launcher
    assert main(["fit", "--recipe", "dino_nano_fmnist", "--model.pretrained", str(exported), "--print_config"]) == 0
    assert f"pretrained: {exported}" in capsys.readouterr().out
