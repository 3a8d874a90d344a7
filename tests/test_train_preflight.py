"""The pre-flight (trainer/preflight.py): every file a run needs and the kind of every manifest,
checked before out_dir is created; `--dry-run` runs exactly those checks (issue 18, items 9, 10
and 13). Problems are one line naming the config key."""

from __future__ import annotations

import sys
import tarfile

import pytest
import yaml

from shardify.manifest import simple_manifest
from tests.train_fixtures import DEMO_CONFIG, REPO, make_teacher, tiny_overrides, write_image_shards
from trainer.cli import main
from trainer.config import load_config
from trainer.errors import UserError
from trainer.loop import Trainer

TEXT_CONFIG = REPO / "configs" / "demo_text.yaml"


@pytest.fixture
def teacher(tmp_path):
    return make_teacher(tmp_path / "teacher.pt")


def text_shards(root):
    """Pre-tokenised OpenWebText-like shards: fields npy and json (one tiny tar)."""
    root.mkdir(parents=True)
    with tarfile.open(root / "train-000000.tar", "w", format=tarfile.USTAR_FORMAT):
        pass
    simple_manifest(root, "openwebtext", ["json", "npy"], {"train": [{"name": "train-000000.tar", "samples": 1}]})
    return root


def dry_run(args, capsys) -> tuple[int, list[str], str]:
    """(exit status, stderr lines, stdout) of `trainer train ... --dry-run`."""
    code = 0
    try:
        main(["train", *args, "--dry-run"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.err.strip().splitlines(), out.out


# -- item 13: --dry-run checks every file, for every task ----------------------------------------------


def test_dry_run_of_image_kd_checks_teacher_manifests_shards_and_splits(tmp_path, teacher, capsys):
    args = [str(DEMO_CONFIG), *tiny_overrides(tmp_path, teacher)]
    code, err, out = dry_run(args, capsys)
    assert code == 0 and yaml.safe_load(out)["teacher"]["checkpoint"] == str(teacher)
    assert err == ["pre-flight: 1 manifest(s) of the right kind, every input file present", "resume: a fresh run"]
    shards = tmp_path / "shards"
    cases = [
        (["teacher.checkpoint=/nonexistent/t.pt"],
         "error: config key 'teacher.checkpoint': file not found: /nonexistent/t.pt"),
        ([f"data.manifests=[{tmp_path / 'nope'}]"], "error: config key 'data.manifests[0]': manifest not found: "),
        (["data.val_split=validation"], "error: config key 'data.val_split': split 'validation' not in manifest"),
    ]
    for extra, message in cases:
        code, err, _ = dry_run(args + extra, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith(message), (extra, err)
    (shards / "train-000002.tar").unlink()
    code, err, _ = dry_run(args, capsys)
    missing = shards / "train-000002.tar"
    assert code == 2 and err == [f"error: config key 'data.manifests[0]': shard not found: {missing} "
                                 f"(listed in {shards / 'manifest.json'})"]
    assert not (tmp_path / "run").exists()


def test_dry_run_of_text_kd_checks_a_local_teacher_and_the_tokenizer(tmp_path, capsys):
    shards = text_shards(tmp_path / "owt")
    args = [str(TEXT_CONFIG), f"data.manifests=[{shards}]", f"out_dir={tmp_path / 'run'}", "data.val_split="]
    code, err, _ = dry_run(args + ["teacher.path=/nonexistent/bert", "data.tokenizer=tok.json"], capsys)
    assert code == 2 and err == ["error: config key 'teacher.path': file not found: /nonexistent/bert"]
    code, err, _ = dry_run(args + ["teacher.path=bert-base-uncased", f"data.tokenizer={tmp_path / 'tok.json'}"], capsys)
    assert code == 2 and err == [f"error: config key 'data.tokenizer': not found: {tmp_path / 'tok.json'}"]
    assert not (tmp_path / "run").exists()


# -- item 9: shards of the wrong kind ---------------------------------------------------------------


def test_text_shards_to_the_image_task_are_refused_before_out_dir_exists(tmp_path, teacher, capsys):
    shards = text_shards(tmp_path / "owt")
    over = tiny_overrides(tmp_path, teacher, **{"data.manifests": f"[{shards}]"})
    message = (f"config key 'data.manifests[0]': {shards / 'manifest.json'} holds dataset 'openwebtext' with fields "
               f"json, npy: task 'image_kd' needs image shards (a jpg field)")
    with pytest.raises(UserError) as e:
        Trainer(load_config(DEMO_CONFIG, over))
    assert str(e.value) == message
    assert not (tmp_path / "run").exists()
    code, err, _ = dry_run([str(DEMO_CONFIG), *over], capsys)
    assert code == 2 and err == [f"error: {message}"]


def test_image_shards_to_the_text_task_are_refused_by_kind(tmp_path):
    shards = write_image_shards(tmp_path / "img", n=8)
    with pytest.raises(UserError) as e:
        load_config(TEXT_CONFIG, [f"data.manifests=[{shards}]", "teacher.path=bert-base-uncased"])
    assert str(e.value) == (f"config key 'data.manifests[0]': {shards / 'manifest.json'} holds dataset 'fixture' "
                            f"with fields cls, jpg, json: task 'text_kd' needs text shards (an npy or txt field)")


def test_eval_probe_refuses_text_shards_with_one_line(tmp_path, teacher, capsys):
    shards = text_shards(tmp_path / "owt")
    with pytest.raises(SystemExit) as e:
        main(["eval", "probe", str(teacher), "--data2vec2", "--train-shards", str(shards), "--val-split", "train",
              "--out", str(tmp_path / "res" / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        f"error: {shards} holds dataset 'openwebtext' with fields json, npy: the linear probe needs image shards "
        f"(a jpg field, and cls)"]
    assert not (tmp_path / "res").exists()


# -- item 10: object storage without its package --------------------------------------------------------


@pytest.mark.parametrize("url,module,extra", [("s3://bucket/shards", "s3fs", "s3"),
                                              ("gs://bucket/shards", "gcsfs", "gcs")])
def test_a_remote_manifest_without_its_package_is_one_line(tmp_path, teacher, capsys, monkeypatch, url, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import s3fs` raises ImportError
    hint = f"{url[:2]}:// needs the {module} package: pip install 'shardify-kd[{extra}]'"
    code, err, _ = dry_run([str(DEMO_CONFIG), *tiny_overrides(tmp_path, teacher, **{"data.manifests": f"[{url}]"})],
                           capsys)
    assert code == 2 and err == [f"error: config key 'data.manifests[0]': {hint}"]
    # the loader's own reading (evaluation commands build it directly) says the same
    from trainer.data.order import load_source

    with pytest.raises(ValueError) as e:
        load_source(url, "train")
    assert str(e.value) == f"cannot read manifest {url}/manifest.json: {hint}"
