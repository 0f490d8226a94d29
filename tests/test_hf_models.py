"""Hugging Face image classifiers (`arch: hf:<dir>`) as teachers and students: staged from their
encoder layers, trained by `sokd train`, and saved back as a Hugging Face folder. Tiny models are
built from configs and written with save_pretrained (no hub)."""
from __future__ import annotations

import pytest
import torch

import sokd
from sokd import cli, methods

from .conftest import tiny_config, write_config

T = pytest.importorskip("transformers")


def _tiny(kind: str):
    vit = dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
               intermediate_size=32, num_labels=4)
    return {
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**vit)),
        "deit": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**vit)),
        "swin": lambda: T.SwinForImageClassification(T.SwinConfig(image_size=16, patch_size=2, embed_dim=8,
                                                                  depths=[1, 1], num_heads=[1, 2], window_size=2,
                                                                  num_labels=4)),
        "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16],
                                                                              depths=[1, 1], num_labels=4)),
        "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                        depths=[1, 1], num_labels=4)),
    }[kind]()


def saved(tmp_path, kind: str):
    folder = tmp_path / f"hf_{kind}"
    torch.manual_seed(0)
    _tiny(kind).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["vit", "deit", "swin", "convnext", "resnet"])
def test_each_family_is_staged_reproduces_its_model_and_is_a_sokd_teacher(tmp_path, kind):
    folder = saved(tmp_path, kind)
    net = sokd.models.create(f"hf:{folder}", num_classes=4)
    model = T.AutoModelForImageClassification.from_pretrained(folder).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(net.eval()(x), model(pixel_values=x).logits, atol=1e-5)
    assert net.num_stages >= 2
    method = methods.create("sokd", teacher=net, student=sokd.models.create("resnet8", num_classes=4),
                            kbm_init="teacher", input_shape=(3, 16, 16), features=[{"kind": "at"}])
    method.eval()
    out = method.predict(x)
    assert torch.allclose(out["kbm"], out["teacher"], atol=1e-5)
    method.train()
    method(x, torch.tensor([0, 1]))["loss"].backward()


def test_a_folder_with_another_number_of_classes_gets_a_fresh_classifier(tmp_path):
    net = sokd.models.create(f"hf:{saved(tmp_path, 'vit')}", num_classes=7)
    assert net(torch.randn(1, 3, 16, 16)).shape == (1, 7)


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "no config.json"),
    (lambda d: ((d / "config.json").write_text("{not json"), d)[1], "cannot load it"),
])
def test_a_bad_folder_is_one_line(tmp_path, make, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    with pytest.raises(sokd.SokdError, match=message) as err:
        sokd.models.create(f"hf:{make(folder)}", num_classes=4)
    assert "\n" not in str(err.value)


def _data():
    return {"name": "synthetic", "synthetic_size": 64, "synthetic_shape": [3, 16, 16], "synthetic_classes": 4,
            "batch_size": 16, "eval_batch_size": 64}


def test_an_hf_student_trains_and_comes_back_as_an_hf_folder(tmp_path, teacher_file):
    """The round trip: an HF ViT student distilled by sokd, saved with save_pretrained beside
    student.pt, reloads with from_pretrained to the same logits as sokd's own model file, and
    carries the run's normalisation in its image processor."""
    import shutil
    shutil.copy(teacher_file, tmp_path / "teacher.pt")
    folder = saved(tmp_path, "vit")
    cfg = tiny_config(tmp_path, "kd", data={**_data(), "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                      train={"epochs": 1, "precision": "fp32"})
    cfg["student"] = {"arch": f"hf:{folder}"}
    out = tmp_path / "run"
    cfg["output"]["dir"] = str(out)
    assert cli.main(["train", str(write_config(tmp_path, cfg))]) == 0
    hf = out / "student_hf"
    assert (hf / "config.json").is_file()
    model = T.AutoModelForImageClassification.from_pretrained(hf).eval()
    x = torch.randn(3, 3, 16, 16)
    trained = sokd.artifacts.load(out / "student.pt")
    assert trained["arch"] == f"hf:{folder}"
    net = sokd.models.create(trained["arch"], num_classes=4)
    net.load_state_dict(trained["state_dict"])
    assert torch.allclose(model(pixel_values=x).logits, net.eval()(x), atol=1e-5)
    untrained = T.AutoModelForImageClassification.from_pretrained(folder).eval()
    assert not torch.allclose(untrained(pixel_values=x).logits, net(x), atol=1e-5)   # it did train
    processor = T.AutoImageProcessor.from_pretrained(hf)
    assert processor.image_mean == pytest.approx([0.5] * 3) and processor.image_std == pytest.approx([0.25] * 3)
    # a folder there that sokd did not write is never replaced
    other = tmp_path / "run2"
    (other / "student_hf").mkdir(parents=True)
    (other / "student_hf" / "mine.txt").write_text("precious")
    cfg["output"]["dir"] = str(other)
    assert cli.main(["train", str(write_config(tmp_path, cfg))]) == 2
    assert (other / "student_hf" / "mine.txt").read_text() == "precious"


def test_each_network_gets_its_own_preprocessing_from_its_folder_or_timm(tmp_path):
    """A Hugging Face teacher whose image processor declares other statistics than the data's
    gets its images renormalised; a timm network with `weights=` does so on request."""
    from types import SimpleNamespace
    from sokd import runner
    from sokd.config import NetworkSpec
    folder = saved(tmp_path, "vit")
    T.ViTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                        size={"height": 16, "width": 16}).save_pretrained(folder)
    data = SimpleNamespace(mean=[0.5] * 3, std=[0.25] * 3, shape=(3, 16, 16))
    net = runner.build_network(NetworkSpec(arch=f"hf:{folder}"), "teacher", 4, 3, data)
    assert net.input_adapter.mean == pytest.approx([0.485, 0.456, 0.406]) and net.input_adapter.size is None
    u = torch.rand(2, 3, 16, 16)
    model = T.AutoModelForImageClassification.from_pretrained(folder).eval()
    own = (u - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(net.eval()((u - 0.5) / 0.25), model(pixel_values=own).logits, atol=1e-4)
    plain = runner.build_network(NetworkSpec(arch=f"hf:{folder}", preprocess="data"), "teacher", 4, 3, data)
    assert getattr(plain, "input_adapter", None) is None
    timm = pytest.importorskip("timm")
    weights = tmp_path / "w.pt"
    torch.save(timm.create_model("resnet10t", num_classes=4).state_dict(), weights)   # timm's own layout
    spec = NetworkSpec(arch="timm.resnet10t", weights=str(weights), preprocess="pretrained")
    timm_net = runner.build_network(spec, "teacher", 4, 3, data)
    assert timm_net.input_adapter.std == pytest.approx([0.229, 0.224, 0.225], abs=1e-3)
    spec = NetworkSpec(arch="timm.resnet10t", weights=str(weights))
    assert getattr(runner.build_network(spec, "teacher", 4, 3, data), "input_adapter", None) is None
