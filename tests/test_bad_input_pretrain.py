"""Bad-input corpus, ``s3d pretrain`` (data side): list files, shards, merge, report, damaged prepared data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from badinput import assert_no_traceback, assert_user_error, case, run_s3d, run_s3d_here, snapshot
from synthetic_scans import write_t1_archive

SMALL = ("--min-file-kb", "0", "--min-fov-mm", "20", "--no-progress", "--prep-workers", "0")
TRAIN = ("--config", "tiny", "--steps", "1", "--batch-size", "2", "--patch-size", "32", "--method-kwargs",
         '{"block_size": 16}', "--workers", "0", "--device", "cpu", "--val-every", "0", "--snapshot-every", "0",
         "--no-progress", "--val-fraction", "0")


def _archive(root: Path, n: int = 3, seed: int = 0) -> Path:
    return write_t1_archive(root, [(36, 38, 34)] * n, seed=seed)


@case("pretrain", "a .txt list whose relative paths are all wrong (written relative to the CWD)", "error")
def test_list_with_no_existing_path(tmp_path: Path) -> None:
    raw = _archive(tmp_path / "raw")
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "files.txt"  # paths relative to tmp_path (the CWD), but the rule is: the list's folder
    listing.write_text("".join(f"{p.relative_to(tmp_path)}\n" for p in sorted(raw.rglob("*.nii.gz"))))
    before = snapshot(raw, listing)
    res = run_s3d("pretrain", "--data", listing, "--out", tmp_path / "prep", "--prepare-only", *SMALL, cwd=tmp_path)
    assert_user_error(res, [str(listing), "list file's folder", str(lists)], rc=1)
    assert snapshot(raw, listing) == before and not (tmp_path / "prep" / "manifest.json").exists()
    # the same list, from the folder the paths are relative to: a list elsewhere must say ../raw/...
    listing.write_text("".join(f"../{p.relative_to(tmp_path)}\n" for p in sorted(raw.rglob("*.nii.gz"))))
    ok = run_s3d("pretrain", "--data", listing, "--out", tmp_path / "prep", "--prepare-only", *SMALL)
    assert ok.rc == 0, ok.text[-2000:]
    assert json.loads((tmp_path / "prep" / "manifest.json").read_text())["counts"]["ok"] == 3


@case("pretrain", "an empty .txt list / a CSV without a 'path' column", "error")
def test_empty_list_and_csv_without_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    res = run_s3d("pretrain", "--data", empty, "--out", tmp_path / "prep", "--prepare-only", *SMALL)
    assert_user_error(res, [str(empty), "holds no path"], rc=1)
    bad_csv = tmp_path / "files.csv"
    bad_csv.write_text("file,modality\na.nii.gz,T1w\n")
    before = snapshot(bad_csv)
    res = run_s3d("pretrain", "--data", bad_csv, "--out", tmp_path / "prep", "--prepare-only", *SMALL)
    assert_user_error(res, [str(bad_csv), "'path' column"], rc=1)
    assert snapshot(bad_csv) == before


@case("pretrain", "a folder in which every image is rejected by a filter", "error")
def test_every_image_rejected(tmp_path: Path) -> None:
    raw = _archive(tmp_path / "raw")
    before = snapshot(raw)
    res = run_s3d("pretrain", "--data", raw, "--out", tmp_path / "prep", "--prepare-only",
                  "--min-file-kb", "0", "--min-fov-mm", "100", "--no-progress", "--prep-workers", "0")
    assert_user_error(res, [str(raw), "no image was accepted", "--report"], rc=1)
    assert snapshot(raw) == before
    rep = run_s3d("pretrain", "--report", tmp_path / "prep")  # the manifest is written and explains it
    assert rep.rc == 0, rep.text
    lines = {ln.split()[0]: ln.split() for ln in rep.out.splitlines() if ln.strip()}
    assert lines["fov"][1] == "3" and "ok" not in lines, rep.out  # all 3 files, each under the rule fov


@case("pretrain", "a truncated .nii.gz and a non-NIfTI file among good images", "skipped")
def test_truncated_file_is_reported_by_rule(tmp_path: Path) -> None:
    raw = _archive(tmp_path / "raw" / "dsA")
    bad = raw / "sub-00" / "anat" / "sub-00_T1w.nii.gz"
    data = gzip.compress(gzip.decompress(bad.read_bytes()))
    bad.write_bytes(data[: len(data) // 2])
    (raw / "notes.txt").write_text("not an image")
    before = snapshot(tmp_path / "raw")
    res = run_s3d("pretrain", "--data", tmp_path / "raw", "--out", tmp_path / "prep", "--prepare-only", *SMALL)
    assert res.rc == 1, res.text[-2000:]  # a batch command: the good files are prepared, the failure reported
    assert_no_traceback(res)
    assert "2 ok" in res.out and "1 failed" in res.out and "1 rejected" in res.out
    assert "1 file(s) could not be read" in res.out and "manifest.json" in res.out
    assert snapshot(tmp_path / "raw") == before
    m = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    by_path = {Path(e["path"]).name: e for e in m["entries"]}
    assert by_path["sub-00_T1w.nii.gz"]["rule"] == "unreadable" and by_path["notes.txt"]["rule"] == "format"
    rep = run_s3d("pretrain", "--report", tmp_path / "prep")
    assert rep.rc == 0, rep.text
    lines = {ln.split()[0]: ln.split() for ln in rep.out.splitlines() if ln.strip()}
    assert lines["ok"][1] == "2" and lines["unreadable"][1] == "1" and lines["format"][1] == "1"
    assert lines["dsA"][1:3] == ["4", "2"]  # dataset dsA: 4 files, 2 used


@case("pretrain", "--shard out of range / malformed, and --shard without --prepare-only", "error")
def test_bad_shard_argument(tmp_path: Path) -> None:
    raw = _archive(tmp_path / "raw")
    for value in ("3/3", "1-of-3"):
        res = run_s3d("pretrain", "--data", raw, "--out", tmp_path / "prep", "--prepare-only", "--shard", value,
                      *SMALL)
        assert_user_error(res, ["--shard", value, "usage: s3d pretrain"], rc=2)  # argparse refuses it
    res = run_s3d("pretrain", "--data", raw, "--out", tmp_path / "run", "--shard", "0/2", *SMALL)
    assert_user_error(res, ["--shard", "--prepare-only"], rc=2)  # refused before any work, like argparse
    assert not (tmp_path / "prep").exists() and not (tmp_path / "run").exists()


@case("pretrain", "--merge before every shard has run", "error")
def test_merge_with_missing_shards(tmp_path: Path) -> None:
    raw = _archive(tmp_path / "raw", n=4)
    prep = tmp_path / "prep"
    res = run_s3d("pretrain", "--data", raw, "--out", prep, "--prepare-only", "--shard", "1/3", *SMALL)
    assert res.rc == 0 and "waiting for the other shards" in res.out, res.text
    before = snapshot(prep)
    res = run_s3d("pretrain", "--merge", prep)
    assert_user_error(res, [str(prep), "0/3", "2/3", "--shard I/3"], rc=1)
    assert snapshot(prep) == before and not (prep / "manifest.json").exists()
    res = run_s3d("pretrain", "--data", prep, "--out", tmp_path / "run", *TRAIN)  # training on it: same advice
    assert_user_error(res, [str(prep), "shard manifests", "--merge"], rc=1)


@case("pretrain", "a damaged manifest.json / a truncated stored case in a prepared folder", "error")
def test_damaged_prepared_folder(tmp_path: Path) -> None:
    raw = _archive(tmp_path / "raw", n=3)
    prep = tmp_path / "prep"
    assert run_s3d("pretrain", "--data", raw, "--out", prep, "--prepare-only", *SMALL).rc == 0
    for case_file in (prep / "cases").glob("*.b2nd"):
        case_file.write_bytes(case_file.read_bytes()[:200])  # truncated
    before = snapshot(raw)
    for workers in ("0", "2"):  # from the main process, or from a DataLoader worker: one line either way
        res = run_s3d("pretrain", "--data", prep, "--out", tmp_path / f"run{workers}", *TRAIN, "--workers", workers)
        assert_user_error(res, [str(prep / "cases"), ".b2nd", "damaged", "--prepare-only"], rc=1)
    (prep / "manifest.json").write_text('{"entries": ')  # cut short
    for args in (("--data", prep, "--out", tmp_path / "run9", *TRAIN), ("--report", prep)):
        res = run_s3d("pretrain", *args)
        assert_user_error(res, [str(prep / "manifest.json"), "prepare the directory again"], rc=1)
    assert snapshot(raw) == before


@case("pretrain", "--report on a folder that was never prepared", "error")
def test_report_on_unprepared_folder(tmp_path: Path) -> None:
    raw = _archive(tmp_path / "raw", n=1)
    before = snapshot(raw)
    res = run_s3d("pretrain", "--report", raw)
    assert_user_error(res, [str(raw), "manifest.json", "--prepare-only"], rc=1)
    assert snapshot(raw) == before


@case("pretrain", "--patch-size too small for the recipe's mask block (1 block: nothing to mask)", "error")
def test_patch_smaller_than_two_mask_blocks(tmp_path: Path) -> None:
    raw = _archive(tmp_path / "raw", n=3)
    prep = tmp_path / "prep"
    assert run_s3d("pretrain", "--data", raw, "--out", prep, "--prepare-only", *SMALL).rc == 0
    train = [a if a != '{"block_size": 16}' else '{"block_size": 32}' for a in TRAIN]  # 32^3 patch = 1 block
    res = run_s3d("pretrain", "--data", prep, "--out", tmp_path / "run", *train)
    assert_user_error(res, ["--patch-size 32 32 32", "block_size 32", "--patch-size 32 32 64",
                            '"block_size": 16'], rc=1)
    assert not (tmp_path / "run" / "checkpoint_latest.pt").exists()  # refused before the first step


def test_corpus_inputs_are_real_nifti(tmp_path: Path) -> None:
    """The archive the cases start from is valid (so each case's failure is the one injected)."""
    raw = _archive(tmp_path / "raw", n=2)
    for p in raw.rglob("*.nii.gz"):
        assert np.asarray(nib.load(str(p)).dataobj).shape == (36, 38, 34)


# ---- pre-training reads images, never label maps --------------------------------------------------
@case("pretrain", "nnU-Net label maps (labelsTr) among the images", "handled")
def test_label_maps_are_rejected_by_a_rule(tmp_path: Path) -> None:
    _archive(tmp_path / "raw" / "mri", n=2)
    labels = tmp_path / "raw" / "labelsTr"
    labels.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):  # uint8 label maps with 3 values, the size and geometry of the images
        nib.save(nib.Nifti1Image(rng.integers(0, 3, (36, 38, 34)).astype(np.uint8), np.eye(4)),
                 str(labels / f"case_{i:03d}.nii.gz"))
    before = snapshot(tmp_path / "raw")
    res = run_s3d("pretrain", "--data", tmp_path / "raw", "--out", tmp_path / "prep", "--prepare-only", *SMALL)
    assert res.rc == 0, res.text[-2000:]
    assert "2 ok" in res.out and "2 rejected" in res.out and snapshot(tmp_path / "raw") == before
    m = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    rules = {Path(e["path"]).name: (e["rule"], e["reason"]) for e in m["entries"]}
    assert rules["case_000.nii.gz"][0] == "labelmap" and "3 distinct integer value(s) (0, 1, 2)" in rules[
        "case_000.nii.gz"][1]
    rep = run_s3d("pretrain", "--report", tmp_path / "prep")  # the report counts them under the rule
    lines = {ln.split()[0]: ln.split() for ln in rep.out.splitlines() if ln.strip()}
    assert lines["labelmap"][1] == "2" and lines["labelsTr"][1:3] == ["2", "0"], rep.out


# ---- arguments and folders, before any file is read ------------------------------------------------
@case("pretrain", "--method-kwargs that is not JSON; --device mps; --resume with --overwrite", "error")
def test_settings_refused_before_any_file_is_read(tmp_path: Path, capsys) -> None:
    raw = _archive(tmp_path / "raw", n=2)
    before = snapshot(raw)
    train = [a for a in TRAIN if a not in ("--method-kwargs", '{"block_size": 16}')]
    for extra, names in ((("--method-kwargs", "{block_size: 16}"), ["--method-kwargs", "not JSON",
                                                                      '\'{"block_size": 16}\'']),
                         (("--method-kwargs", "[16]"), ["--method-kwargs", "a JSON object"]),
                         (("--device", "mps"), ["--device", "'mps'", "not supported"]),
                         (("--resume", "--overwrite"), ["--resume and --overwrite"])):
        res = run_s3d_here(capsys, "pretrain", "--data", raw, "--out", tmp_path / "run", *train,
                           "--method-kwargs", '{"block_size": 16}', *extra)
        assert_user_error(res, names, rc=2)
    assert snapshot(raw) == before and not (tmp_path / "run").exists()  # nothing was prepared


@case("pretrain", "--out inside --data, --out = prepared --data; --data a NIfTI file", "error")
def test_out_overlaps_data_and_data_is_a_file(tmp_path: Path, capsys) -> None:
    raw = _archive(tmp_path / "raw", n=2)
    before = snapshot(raw)
    res = run_s3d_here(capsys, "pretrain", "--data", raw, "--out", raw / "prep", "--prepare-only", *SMALL)
    assert_user_error(res, [str(raw / "prep"), "inside the --data folder"], rc=2)
    image = next(raw.rglob("*.nii.gz"))
    res = run_s3d_here(capsys, "pretrain", "--data", image, "--out", tmp_path / "prep", "--prepare-only", *SMALL)
    assert_user_error(res, [f"{image}: a NIfTI file", "a folder of NIfTI files", str(image.parent)], rc=1)
    assert snapshot(raw) == before and not (tmp_path / "prep").exists()
    prep = tmp_path / "prep"
    assert run_s3d_here(capsys, "pretrain", "--data", raw, "--out", prep, "--prepare-only", *SMALL).rc == 0
    prepared = snapshot(prep)
    res = run_s3d_here(capsys, "pretrain", "--data", prep, "--out", prep, *TRAIN)
    assert_user_error(res, [str(prep), "is the prepared --data folder"], rc=2)
    assert snapshot(prep) == prepared


@case("pretrain", "a manifest whose file points out of the prepared folder; a finished run's folder", "error")
def test_manifest_path_and_finished_run(tmp_path: Path, capsys) -> None:
    raw = _archive(tmp_path / "raw", n=3)
    prep = tmp_path / "prep"
    assert run_s3d_here(capsys, "pretrain", "--data", raw, "--out", prep, "--prepare-only", *SMALL).rc == 0
    finished = tmp_path / "finished"
    (finished / "backbone").mkdir(parents=True)
    (finished / "backbone" / "model.safetensors").write_bytes(b"an earlier run's backbone")
    before = snapshot(finished)
    res = run_s3d_here(capsys, "pretrain", "--data", prep, "--out", finished, *TRAIN)
    assert_user_error(res, [str(finished), "finished pretrain run (backbone/)", "--resume", "--overwrite"], rc=1)
    assert snapshot(finished) == before
    manifest = json.loads((prep / "manifest.json").read_text())
    manifest["entries"][0]["file"] = "../../../etc/passwd"
    (prep / "manifest.json").write_text(json.dumps(manifest))
    res = run_s3d_here(capsys, "pretrain", "--data", prep, "--out", tmp_path / "run", *TRAIN)
    assert_user_error(res, [str(prep / "manifest.json"), "'../../../etc/passwd'", "relative folder reference"], rc=1)


@case("pretrain", "the loss becomes NaN (--lr 1e30), checked every 3 steps", "error")
def test_nan_loss_stops_pretraining(tmp_path: Path) -> None:
    import re

    import torch

    raw = _archive(tmp_path / "raw", n=3)
    prep = tmp_path / "prep"
    assert run_s3d("pretrain", "--data", raw, "--out", prep, "--prepare-only", *SMALL).rc == 0
    out = tmp_path / "run"
    train = list(TRAIN)
    train[train.index("--steps") + 1] = "8"
    res = run_s3d("pretrain", "--data", prep, "--out", out, *train, "--lr", "1e30", "--log-every", "3",
                  "--checkpoint-every", "1")
    assert_user_error(res, ["(lr ", "not finite", "nothing was exported"], rc=1)
    m = re.search(r"step (\d+) \(lr [0-9.e+]+\): .*?(no checkpoint had been written|checkpoint \S+ \(step (\d+)\) "
                  r"is kept)", res.err)
    assert m is not None, res.err
    if m.group(3) is not None:  # the first step whose loss was not finite is named, not the next log step
        assert int(m.group(3)) == int(m.group(1)) - 1
        state = torch.load(out / "checkpoint_latest.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values()
                       if torch.is_tensor(v) and v.is_floating_point())  # not the engine choices (extra state)
    assert not (out / "backbone").exists() and not (out / "nnssl").exists()
