"""`pesc push`: a fake HfApi (no network) sees the repo created and exactly the folder uploaded."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.utils import filter_repo_objects

import pesc.hub
from pesc.cli import main
from pesc.export import export
from pesc.hub import push
from pesc.testing.trained_run import save_fake_trained_run


class FakeHfApi:
    """Records calls; `upload_folder` resolves the files exactly as huggingface_hub does (patterns on relative paths)."""

    instances: list = []

    def __init__(self, token):
        self.token = token
        self.calls = []
        self.uploaded = None
        FakeHfApi.instances.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        kept = filter_repo_objects(names, allow_patterns=kwargs.get("allow_patterns"),
                                   ignore_patterns=kwargs.get("ignore_patterns"))
        self.uploaded = {name: (folder / name).read_bytes() for name in kept}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("hub")
    save_fake_trained_run(root / "run", tiny_llama_dir)
    return export(root / "run", root / "pesc-tiny", dtype="float32", log=lambda message: None)


@pytest.fixture(autouse=True)
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    FakeHfApi.instances.clear()


def test_push_creates_repo_and_uploads_exactly_the_folder(exported):
    plan = push(exported, "someone/pesc-tiny", private=True, revision="v1", commit_message="first",
                token="hf_fake", api_factory=FakeHfApi, echo=lambda line: None)
    (api,) = FakeHfApi.instances
    assert api.token == "hf_fake"
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "someone/pesc-tiny", "private": True, "exist_ok": True, "repo_type": "model"}
    upload = api.calls[2][1]
    assert Path(upload["folder_path"]) == exported
    assert (upload["repo_id"], upload["revision"], upload["commit_message"]) == ("someone/pesc-tiny", "v1", "first")
    on_disk = {p.name: p.read_bytes() for p in exported.iterdir() if p.name != ".pesc-export"}
    assert (exported / ".pesc-export").is_file()  # pesc's local marker stays home
    assert api.uploaded == on_disk
    assert [name for name, _ in plan.files] == sorted(on_disk)
    assert dict(plan.files) == {name: len(data) for name, data in on_disk.items()}

    card = ModelCard(api.uploaded["README.md"].decode())
    assert {"moe", "pesc", "mixture-of-experts"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert metadata_load(exported / "README.md")["tags"] == card.data.tags


def test_push_token_from_environment_and_main_revision(exported, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    push(exported, "someone/pesc-tiny", api_factory=FakeHfApi, echo=lambda line: None)
    (api,) = FakeHfApi.instances
    assert api.token == "hf_env"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is False


def test_dry_run_lists_files_and_card_and_uploads_nothing(exported, capsys, monkeypatch):
    monkeypatch.setattr(pesc.hub, "_default_api", lambda token: pytest.fail("dry run built an HfApi"))
    main(["push", str(exported), "--repo-id", "someone/pesc-tiny", "--dry-run"])
    out = capsys.readouterr().out
    listed = [line.split()[-1] for line in out.splitlines() if line.startswith("  ")]
    assert listed == sorted(p.name for p in exported.iterdir() if p.name != ".pesc-export")
    assert "model-00001-of-00001.safetensors" in out and "KB" in out
    assert (exported / "README.md").read_text().strip() in out
    assert FakeHfApi.instances == []


def test_push_through_cli_uses_the_api(exported, monkeypatch, capsys):
    monkeypatch.setattr(pesc.hub, "_default_api", FakeHfApi)
    main(["push", str(exported), "--repo-id", "someone/pesc-tiny", "--token", "hf_cli"])
    (api,) = FakeHfApi.instances
    assert api.token == "hf_cli" and api.uploaded
    assert "pushed" in capsys.readouterr().out


def _fails(args, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


def test_missing_token_is_one_line_and_uploads_nothing(exported, capsys, monkeypatch):
    monkeypatch.setattr(pesc.hub, "_default_api", FakeHfApi)
    err = _fails(["push", str(exported), "--repo-id", "someone/pesc-tiny"], capsys)
    assert "no Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err
    assert FakeHfApi.instances == []


def test_push_refuses_what_is_not_a_model_folder(exported, tmp_path, capsys):
    err = _fails(["push", str(tmp_path), "--repo-id", "someone/x", "--dry-run"], capsys)
    assert "no config.json" in err
    (tmp_path / "config.json").write_text((exported / "config.json").read_text())
    err = _fails(["push", str(tmp_path), "--repo-id", "someone/x", "--dry-run"], capsys)
    assert "no safetensors weights" in err
    (tmp_path / "model.safetensors").write_bytes(b"")
    err = _fails(["push", str(tmp_path), "--repo-id", "someone/x", "--dry-run"], capsys)
    assert "no README.md model card" in err
    err = _fails(["push", str(exported), "--repo-id", "not a repo", "--dry-run"], capsys)
    assert "USER/NAME" in err


def test_push_a_converted_checkpoint(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    main(["convert", str(tiny_llama_dir), str(out), "--num-experts", "4", "--adapter-dim", "16"])
    plan = push(out, "someone/pesc-converted", token="hf_fake", api_factory=FakeHfApi, echo=lambda line: None)
    (api,) = FakeHfApi.instances
    expected = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".pesc-")}
    assert set(api.uploaded) == expected == {name for name, _ in plan.files}
    assert json.loads(api.uploaded["config.json"])["model_type"] == "pesc"


SECRETS = [".env", "token.txt", "hf_token", "deploy.pem", "id_ed25519", "notes/.env.local", "credentials.json"]


@pytest.fixture
def folder_with_secrets(exported, tmp_path):
    import shutil

    folder = shutil.copytree(exported, tmp_path / "with-secrets")
    for name in SECRETS:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("HF_TOKEN=hf_secret\n")
    return folder


def test_files_that_look_like_secrets_are_left_out_and_named(folder_with_secrets, capsys):
    lines = []
    push(folder_with_secrets, "someone/pesc-tiny", token="hf_fake", api_factory=FakeHfApi, echo=lines.append)
    uploaded = set(FakeHfApi.instances[-1].uploaded)
    assert not uploaded & set(SECRETS)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= uploaded  # model files named *token* go
    assert sorted(line.split()[2].rstrip(":") for line in lines if line.startswith("left out")) == sorted(SECRETS)
    main(["push", str(folder_with_secrets), "--repo-id", "someone/pesc-tiny", "--dry-run"])
    listing = capsys.readouterr().out
    listed = [line.split()[-1] for line in listing.splitlines() if line.startswith("  ")]
    assert not set(listed) & set(SECRETS) and "config.json" in listed
    assert all(f"left out {name}" in listing for name in SECRETS)


def test_include_file_uploads_a_secret_looking_file_the_user_names(folder_with_secrets, capsys):
    push(folder_with_secrets, "someone/pesc-tiny", token="hf_fake", api_factory=FakeHfApi, echo=lambda line: None,
         include_files=("token.txt",))
    uploaded = set(FakeHfApi.instances[-1].uploaded)
    assert "token.txt" in uploaded and not uploaded & (set(SECRETS) - {"token.txt"})
    with pytest.raises(SystemExit):
        main(["push", str(folder_with_secrets), "--repo-id", "someone/x", "--dry-run", "--include-file", "nope.txt"])
    assert "--include-file nope.txt is not a file" in capsys.readouterr().err
