"""Pretrained-weight loading, checked against Hugging Face's CvtForImageClassification."""

import json
import pickle

import pytest
import torch
from PIL import Image
from transformers import CvtConfig as HFConfig
from transformers import CvtForImageClassification

import cvtlab
from cvtlab import CvtLabError
from cvtlab.models.convert import cvtlab_to_hf, hf_to_cvtlab

HF_CONFIGS = {
    "cvt-13": {},
    "cvt-21": {"depth": [1, 4, 16]},
    # Odd widths, heads, kernels, ratios and a non-default stem; the hf port needs depth[i] > i.
    "odd": {
        "embed_dim": [24, 48, 72],
        "num_heads": [2, 3, 4],
        "depth": [1, 2, 3],
        "patch_sizes": [5, 3, 3],
        "patch_padding": [2, 1, 1],
        "mlp_ratio": [2.0, 3.0, 4.0],
        "num_labels": 7,
    },
}


def random_hf_model(**kwargs):
    torch.manual_seed(0)
    model = CvtForImageClassification(HFConfig(**kwargs)).eval()
    # Non-trivial BatchNorm statistics, so a wrong BN mapping cannot hide.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf_pair(request, tmp_path_factory):
    hf = random_hf_model(**HF_CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("size", [224, 64])
@pytest.mark.parametrize("batch", [1, 4])
def test_logits_match_hugging_face(hf_pair, size, batch):
    hf, folder = hf_pair
    ours = cvtlab.from_pretrained(folder, act_layer="gelu").eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4


def test_hf_folder_defaults_to_quick_gelu_of_the_official_weights(hf_pair):
    _, folder = hf_pair
    model = cvtlab.from_pretrained(folder)
    assert type(model.stage0.blocks[0].mlp.act).__name__ == "QuickGELU"
    # Named as the registered model it is (what exports and summaries call it), else custom.
    assert model.model_name == {"cvt-13": "cvt_13", "cvt-21": "cvt_21"}.get(
        folder.name[:6], "custom"
    )


def test_state_dict_round_trips_through_hugging_face_names():
    ours = cvtlab.create_model("cvt_13", num_classes=5, act_layer="gelu").eval()
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
    sd = ours.state_dict()
    hf_sd = cvtlab_to_hf(sd)
    assert "cvt.encoder.stages.2.layers.3.attention.attention.projection_query.weight" in hf_sd
    back = hf_to_cvtlab(hf_sd)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    hf = CvtForImageClassification(HFConfig(num_labels=5)).eval()
    hf.load_state_dict(hf_sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-4


def official_checkpoint(tmp_path, name="cvt_13", num_classes=1000):
    torch.manual_seed(1)
    model = cvtlab.create_model(name, num_classes=num_classes).eval()
    path = tmp_path / "CvT-13-224x224-IN-1k.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_official_pth_with_model_name_and_inferred(tmp_path):
    ref, path = official_checkpoint(tmp_path)
    x = torch.randn(1, 3, 224, 224)
    named = cvtlab.create_model("cvt_13", pretrained=str(path)).eval()
    inferred = cvtlab.from_pretrained(path).eval()
    assert inferred.model_name == "cvt_13"
    with torch.no_grad():
        want = ref(x)
        assert torch.equal(named(x), want) and torch.equal(inferred(x), want)


def test_official_imagenet_weights_know_their_classes_and_score_wordnet_folders(tmp_path):
    """Official files carry no class names: their 1,000 outputs are ImageNet-1k's, in sorted
    WordNet-id order, so they predict named classes and score a folder of wnid-named classes
    (ImageNet's own layout, here three of them) by id."""
    import numpy as np
    import torch.nn.functional as F

    from cvtlab.evaluation import evaluate
    from cvtlab.inference import read_image

    _, path = official_checkpoint(tmp_path)
    model = cvtlab.from_pretrained(path).eval()
    assert len(model.class_names) == 1000 and model.class_names[281] == "tabby, tabby cat"
    wanted = {"n01443537": 1, "n02123045": 281, "n15075141": 999}  # goldfish, tabby, tissue
    files, targets = [], []
    for k, (wnid, index) in enumerate(wanted.items()):
        for j in range(2):
            file = tmp_path / "val" / wnid / f"{j}.png"
            file.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (90, 70), (60 * k, 90 * j, 30)).save(file)
            files.append(file)
            targets.append(index)
    result = evaluate(str(path), str(tmp_path / "val"), "all", batch_size=4)
    images = np.stack([read_image(f, 224) for f in files])
    from cvtlab.data.augment import normalize

    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(images)))
    expected = F.cross_entropy(logits, torch.tensor(targets)).item()
    assert result["n"] == 6 and result["num_classes"] == 1000
    assert abs(result["loss"] - expected) < 1e-4
    assert set(result["per_class"]) == set(wanted)


def test_official_files_are_evaluated_at_their_size_and_crop(tmp_path):
    """Official weights are seen as their makers evaluated them: at the size the file's name
    gives (the tensors fit every size), the centre 0.875 of the shorter side below 384 px and
    the whole image resized to a square from 384 px up. --img-size and --crop override."""
    import shutil

    import numpy as np
    import torch.nn.functional as F

    from cvtlab.data.augment import normalize
    from cvtlab.evaluation import evaluate
    from cvtlab.export import export
    from cvtlab.inference import load_predictor

    ref, path224 = official_checkpoint(tmp_path)
    path384 = tmp_path / "CvT-13-384x384-IN-1k.pth"
    shutil.copy(path224, path384)
    views = {
        (path224, None, None): (224, 0.875),
        (path384, None, None): (384, "squash"),
        (path384, 256, None): (256, 0.875),
        (path384, 224, "1"): (224, 1.0),
    }
    for (path, size, crop), want in views.items():
        predictor = load_predictor(path, size, None if crop is None else float(crop))
        assert (predictor.img_size, predictor.crop) == want, (path.name, size, crop)
        assert predictor.model.cfg.img_size == want[0]
    # A model named by the caller keeps its own size whatever the file's name says.
    assert cvtlab.from_pretrained(path384, model="cvt_13_64", num_classes=1000).img_size == 64

    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    file = tmp_path / "val" / "n01443537" / "a.png"  # goldfish, output 1
    file.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(file)
    result = evaluate(str(path224), str(tmp_path / "val"), "all")
    seen = Image.fromarray(pixels).resize((384, 256), Image.BILINEAR).crop((80, 16, 304, 240))
    with torch.no_grad():
        logits = ref(normalize(torch.from_numpy(np.asarray(seen).copy())[None]))
    assert abs(result["loss"] - F.cross_entropy(logits, torch.tensor([1])).item()) < 1e-4
    assert (result["img_size"], result["crop"]) == (224, 0.875)
    assert result["view"] == "shorter side to 256, centre 224x224 (crop 0.875)"
    # A cvtlab export of official weights keeps how they are evaluated.
    out = tmp_path / "w.safetensors"
    export(path384, out)
    assert (load_predictor(out).img_size, load_predictor(out).crop) == (384, "squash")


def test_hugging_face_processor_gives_the_size_and_crop(tmp_path):
    from cvtlab.inference import load_predictor

    random_hf_model(**HF_CONFIGS["odd"]).save_pretrained(tmp_path)
    assert (load_predictor(tmp_path).img_size, load_predictor(tmp_path).crop) == (224, 0.875)
    for size, want in ((384, "squash"), (160, 0.9)):
        processor = {"crop_pct": 0.9, "size": {"shortest_edge": size}}
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
        predictor = load_predictor(tmp_path)
        assert (predictor.img_size, predictor.crop) == (size, want)


def test_img_size_and_crop_flags_are_checked_in_one_line(tmp_path):
    from .conftest import run_cli_here

    _, path = official_checkpoint(tmp_path)
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    for flags, message in (
        (["--crop", "2"], "--crop must be a fraction in (0, 1]"),
        (["--crop", "wide"], "--crop must be a fraction in (0, 1]"),
        (["--img-size", "100"], "image size 100 is not a positive multiple of cvt_13's total"),
        (["--img-size", "0"], "--img-size: must be a whole number of at least 1"),
    ):
        r = run_cli_here("predict", "--checkpoint", str(path), str(tmp_path / "a.png"), *flags)
        assert r.returncode != 0 and message in r.stderr, (flags, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 or "usage" in r.stderr


def test_finetuning_imagenet_weights_on_some_of_its_classes_keeps_their_head_rows(tmp_path):
    """Tiny ImageNet's classes (named by description) and ImageNet folders (by WordNet id) are
    ImageNet-1k classes: an official file's head rows for them start the new head."""
    from cvtlab.models.imagenet import imagenet_1k_classes
    from cvtlab.models.pretrained import start_from_pretrained

    ref, path = official_checkpoint(tmp_path)
    wnids, descriptions = imagenet_1k_classes()
    model = cvtlab.create_model("cvt_13_64", num_classes=2)
    line = start_from_pretrained(model, path, "cvt_13_64", [descriptions[281], wnids[1]])
    assert torch.equal(model.head.weight, ref.head.weight[[281, 1]])
    assert "its head's rows for these 2 classes (of its 1000)" in line
    # A class ImageNet-1k does not have: a fresh head.
    model = cvtlab.create_model("cvt_13_64", num_classes=2)
    line = start_from_pretrained(model, path, "cvt_13_64", [descriptions[281], "my cat"])
    assert "a fresh 2-class head (its head predicts 1000 classes)" in line


def test_hugging_face_imagenet_labels_match_wordnet_folders(tmp_path):
    """A Hugging Face ImageNet model names its classes in words of its own; an ImageNet folder
    names them by WordNet id: eval matches the two through the id's place in ImageNet-1k."""
    from cvtlab.evaluation import evaluate
    from cvtlab.models.imagenet import imagenet_1k_classes

    wnids, descriptions = imagenet_1k_classes()
    labels = {i: d for i, d in enumerate(descriptions)}
    labels[1] = "goldfish"  # not the WordNet description ("goldfish, Carassius auratus")
    hf = random_hf_model(**{**HF_CONFIGS["odd"], "num_labels": 1000, "id2label": labels})
    hf.save_pretrained(tmp_path / "hf")
    for wnid in (wnids[1], wnids[281]):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (64, 64), (200, 100, 0)).save(tmp_path / "val" / wnid / "a.png")
    result = evaluate(str(tmp_path / "hf"), str(tmp_path / "val"), "all")
    assert result["n"] == 2 and set(result["per_class"]) == {wnids[1], wnids[281]}
    assert cvtlab.from_pretrained(tmp_path / "hf").class_names[1] == "goldfish"


def test_other_num_classes_replaces_only_the_head(tmp_path):
    ref, path = official_checkpoint(tmp_path)
    model = cvtlab.from_pretrained(path, num_classes=200)
    assert model.head.out_features == 200
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd if not k.startswith("head."))
    # Official ImageNet weights also load into the 64-px variant (same shapes, other stem stride).
    small = cvtlab.create_model("cvt_13_64", pretrained=str(path))
    assert torch.equal(small.stage0.patch_embed.proj.weight, ref.stage0.patch_embed.proj.weight)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    _, path = official_checkpoint(tmp_path)
    with pytest.raises(CvtLabError, match=r"stage1\..*\(192.*\(128"):
        cvtlab.create_model("cvt_xs_64", pretrained=str(path))


def test_missing_and_unknown_keys_are_listed(tmp_path):
    ref, _ = official_checkpoint(tmp_path)
    sd = ref.state_dict()
    sd.pop("norm.weight")
    sd["stage9.extra"] = torch.zeros(1)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    with pytest.raises(
        CvtLabError, match=r"missing keys: norm\.weight.*unknown keys: stage9\.extra"
    ):
        cvtlab.create_model("cvt_13", pretrained=str(path))


def test_broken_foreign_and_pickled_files_are_clear_errors(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint at all")
    neither = r"not a PyTorch checkpoint \(neither a zip nor a pickle\)"
    with pytest.raises(CvtLabError, match="broken.pth: " + neither):
        cvtlab.from_pretrained(broken)
    text = tmp_path / "notes.pth"
    text.write_text("junk\n")
    with pytest.raises(CvtLabError, match="notes.pth: " + neither):
        cvtlab.from_pretrained(text)
    photo = tmp_path / "photo.jpg"  # an image given where weights go
    Image.new("RGB", (8, 8)).save(photo)
    with pytest.raises(CvtLabError, match="photo.jpg: " + neither):
        cvtlab.from_pretrained(photo)
    whole = tmp_path / "whole.pth"
    torch.save({"w": torch.zeros(1000)}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(CvtLabError, match="cut.pth: not a readable PyTorch checkpoint"):
        cvtlab.from_pretrained(cut)
    # An arbitrary pickled object is refused, never executed (weights_only=True), and the
    # message does not pass on PyTorch's advice to load it with weights_only=False.
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(ValueError("boom")))
    with pytest.raises(CvtLabError, match="evil.pth: .*objects besides tensors") as refused:
        cvtlab.from_pretrained(evil)
    assert "weights_only" not in str(refused.value)
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, foreign)
    with pytest.raises(CvtLabError, match="cannot tell which architecture"):
        cvtlab.from_pretrained(foreign)
    with pytest.raises(CvtLabError, match="no such checkpoint file"):
        cvtlab.from_pretrained(tmp_path / "absent.pth")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CvtLabError, match="config.json"):
        cvtlab.from_pretrained(tmp_path / "folder")


def test_hf_config_that_is_not_cvt(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(CvtLabError, match="does not describe a CvT"):
        cvtlab.from_pretrained(tmp_path)


def test_safetensors_round_trip_keeps_architecture_and_class_names(tmp_path):
    model = cvtlab.create_model(
        "cvt_xs_64", num_classes=3, act_layer="gelu", drop_path_rate=0.0
    ).eval()
    path = cvtlab.save_weights(model, tmp_path / "w.safetensors", class_names=["a", "b", "c"])
    loaded = cvtlab.from_pretrained(path).eval()
    assert loaded.cfg == model.cfg and loaded.class_names == ["a", "b", "c"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    seed = cvtlab.create_model("cvt_seed", num_classes=4).eval()
    seed_loaded = cvtlab.from_pretrained(
        cvtlab.save_weights(seed, tmp_path / "s.safetensors")
    ).eval()
    with torch.no_grad():
        assert torch.equal(seed_loaded(x), seed(x))
    # Without a head (num_classes=0): the pooled features the trained model classifies.
    features = cvtlab.from_pretrained(path, num_classes=0).eval()
    with torch.no_grad():
        assert torch.equal(model.head(features(x)), model(x))


def test_hub_id_offline_gives_a_clear_error():
    code = (
        "import cvtlab\n"
        "try:\n    cvtlab.from_pretrained('hf:microsoft/cvt-13')\n"
        "except cvtlab.CvtLabError as e:\n    print(e)\n"
    )
    import subprocess
    import sys

    env_extra = {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": "/tmp/cvtlab-hf-none",
    }
    import os

    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env_extra},
    )
    assert "hf:microsoft/cvt-13: could not download" in r.stdout
    assert "pass its path" in r.stdout


class _HubFiles:
    """The Hugging Face hub's file API for one model repository, served from a folder: the
    revision, the file tree and each file, as ``huggingface_hub.snapshot_download`` asks."""

    commit = "c" * 40

    def __init__(self, folder):
        import hashlib

        self.files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        self.tree = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in self.files.items()
        ]
        self.asked: list[str] = []

    def handler(self):
        import http.server

        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                hub.asked.append(path.rsplit("/", 1)[-1])
                if "/tree/" in path:
                    body = json.dumps(hub.tree).encode()
                elif path.startswith("/api/models/"):
                    siblings = [{"rfilename": name} for name in hub.files]
                    repo = path.removeprefix("/api/models/").split("/revision/")[0]
                    info = {"id": repo, "sha": hub.commit, "siblings": siblings}
                    body = json.dumps(info).encode()
                elif path.rsplit("/", 1)[-1] in hub.files:
                    body = hub.files[path.rsplit("/", 1)[-1]]
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{hash(body)}"')
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            do_HEAD = do_GET

        return Handler


def test_hub_id_downloads_the_model_and_its_processor_from_the_hub(tmp_path):
    """``hf:<repo>`` fetches config.json, the weights and preprocessor_config.json (the size and
    crop the model is evaluated at) from the hub, here a stand-in on 127.0.0.1."""
    import http.server
    import os
    import subprocess
    import sys
    import threading

    hf = random_hf_model(**HF_CONFIGS["odd"])
    hf.save_pretrained(tmp_path / "repo")
    processor = {"crop_pct": 0.875, "size": {"shortest_edge": 384}}
    (tmp_path / "repo" / "preprocessor_config.json").write_text(json.dumps(processor))
    (tmp_path / "repo" / "README.md").write_text("a model card, not downloaded\n")
    hub = _HubFiles(tmp_path / "repo")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), hub.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "from cvtlab.inference import load_predictor\n"
        "p = load_predictor('hf:me/cvt-odd-384')\n"
        "x = torch.load(sys.argv[1], weights_only=True)\n"
        "with torch.no_grad():\n    torch.save(p.model(x), sys.argv[2])\n"
        "print(p.img_size, p.crop, p.model.model_name)\n"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:2] == ["384", "squash"]
    assert "README.md" not in hub.asked and "preprocessor_config.json" in hub.asked
    ours = cvtlab.from_pretrained(tmp_path / "repo").eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), ours(x))
