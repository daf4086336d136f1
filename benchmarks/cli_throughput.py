"""`segcli predict` as a user runs it (the CLI, a subprocess, default flags) against torchvision
loops run the same way; the `--mode cli` of benchmarks/predict_throughput.py.

Every pipeline is a fresh process over N photos and over 2N (the same photos twice, under other
names); images/s = N / (time(2N) - time(N)), so process start, imports, weight loading and the
first pass over each image size (oneDNN primitive creation) cancel, and start-up is reported on
its own as time(N) - N / (images/s). Pipelines take turns within each round (the order rotates),
ratios are taken within a round and the median over rounds is printed: on a shared machine the
ratio is steadier than either time. CPU seconds per image (user + system of the child, same
difference) are printed too.

  plain         benchmarks/torchvision_loop.py: PIL, torchvision's model in fp32, one image at a
                time, threshold, pycocotools encode per mask, COCO results written at the end
  tuned         the same with bf16 autocast + channels_last
  segcli        segcli predict FOLDER --weights CKPT --out preds.json -q (default precision)
  segcli-fp32   the same with --precision fp32 (checked against plain with the parity contract)
  baseline      with --baseline DIR: segcli predict (default precision) from another checkout
                (PYTHONPATH=DIR), e.g. main, to measure a change
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pycocotools import mask as mask_utils

from benchmarks.common import COCO_TINY, ROOT, seeded_state_dict
from benchmarks.stage_profile import format_profile, profile_predict
from segcli.categories import COCO_LABELS
from segcli.model.parity import compare_detections
from segcli.weights import save_checkpoint

TORCHVISION_LOOP = ROOT / "benchmarks" / "torchvision_loop.py"


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)  # seconds per round: time(2N) - time(N)
    startup: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    detections: float = 0.0  # per image, from the last 2N output


def photos_folders(tmp: Path, count: int) -> tuple[list[Path], Path, Path, Path]:
    photos = sorted((COCO_TINY / "val2017").glob("*.jpg"))[:count]
    if not photos:
        raise SystemExit(f"no photos under {COCO_TINY}/val2017; ../shared/data must be beside the project")
    single, double, warm = tmp / "n", tmp / "2n", tmp / "warm-up"
    for folder, copies, chosen in ((single, ("a",), photos), (double, ("a", "b"), photos), (warm, ("w",), photos[:1])):
        folder.mkdir()
        for prefix in copies:
            for photo in chosen:
                # Copies, not links: segcli predicts a file reached by two paths once.
                shutil.copyfile(photo, folder / f"{prefix}_{photo.name}")
    return photos, single, double, warm


def commands(arch: str, checkpoint: Path, state: Path, precisions: list[str], baseline: Path | None) -> dict[str, callable]:
    """pipeline name -> (folder, out file) -> argv"""
    python = sys.executable

    def torchvision(tuned: bool):
        return lambda folder, out: [python, str(TORCHVISION_LOOP), "--arch", arch, "--state", str(state), "--out", str(out),
                                    *(["--tuned"] if tuned else []), *sorted(str(p) for p in folder.iterdir())]

    def segcli(precision: str, checkout: Path | None = None):
        extra = [] if precision == "auto" else ["--precision", precision]
        prefix = [] if checkout is None else ["env", f"PYTHONPATH={checkout.resolve()}"]
        return lambda folder, out: [*prefix, python, "-m", "segcli", "predict", str(folder), "--weights", str(checkpoint),
                                    "--out", str(out), "-q", *extra]

    pipelines = {"plain": torchvision(False), "tuned": torchvision(True)}
    for precision in precisions:
        pipelines["segcli" if precision == "auto" else f"segcli-{precision}"] = segcli(precision)
    if baseline is not None:
        pipelines["baseline"] = segcli("auto", baseline)
    return pipelines


def timed_run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one subprocess; its output must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def load_detections(path: Path, names: list[str]) -> dict[str, tuple]:
    """{file name: (boxes xyxy, scores, category ids, bool masks [n, H, W])} from either output."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):  # segcli's COCO file
        name_of = {image["id"]: Path(image["file_name"]).name for image in data["images"]}
        if sorted(name_of.values()) != sorted(names):
            raise SystemExit(f"{path} holds {len(name_of)} images, not the {len(names)} given")
        anns = [(name_of[a["image_id"]], a) for a in data["annotations"]]
    else:  # the torchvision loop's results list, image ids in `names` order
        anns = [(names[a["image_id"] - 1], a) for a in data]
    grouped: dict[str, list[dict]] = {name: [] for name in names}
    for name, ann in anns:
        grouped[name].append(ann)
    out = {}
    for name, group in grouped.items():
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in group]).reshape(-1, 4)
        masks = (torch.from_numpy(mask_utils.decode([a["segmentation"] for a in group]).transpose(2, 0, 1).astype(bool))
                 if group else torch.zeros((0, 1, 1), dtype=torch.bool))
        out[name] = (boxes, torch.tensor([a["score"] for a in group]), torch.tensor([a["category_id"] for a in group]), masks)
    return out


def parity(reference: dict[str, tuple], candidate: dict[str, tuple]) -> tuple[int, int]:
    matched = total = 0
    for name, expected in reference.items():
        report = compare_detections(*expected, *candidate[name])
        matched += report.matched
        total += max(report.reference_count, report.candidate_count)
    return matched, total


def machine_line() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{model}, {os.cpu_count()} cores, AMX {'yes' if amx else 'no'}, AVX-512 BF16 {'yes' if bf16 else 'no'}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}")


def load_line() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def run_cli_benchmark(archs: list[str], count: int, rounds: int, precisions: list[str], profile: bool,
                      baseline: Path | None = None) -> None:
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine: " + machine_line())
    print(f"start:   {load_line()} (a busy machine slows every pipeline; ratios within a round are steadier)\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="segcli-bench-") as tmp_name:
        tmp = Path(tmp_name)
        photos, single, double, warm = photos_folders(tmp, count)
        names_2n = sorted(p.name for p in double.iterdir())
        for arch in archs:
            state = seeded_state_dict(arch, photos)
            checkpoint, state_file = tmp / f"{arch}.pt", tmp / f"{arch}-torchvision.pt"
            categories = [{"id": i, "name": name} for i, name in enumerate(COCO_LABELS) if i]
            save_checkpoint(checkpoint, state, arch, categories, list(range(len(COCO_LABELS))), {"seed": 0})
            torch.save(state, state_file)
            pipelines = commands(arch, checkpoint, state_file, precisions, baseline)
            timings = {name: Timing() for name in pipelines}
            outputs = {name: tmp / f"{arch}-{name}.json" for name in pipelines}
            for name, argv in pipelines.items():  # untimed, one photo: file caches warm for every pipeline
                timed_run(argv(warm, outputs[name]))
            order = list(pipelines)
            for round_index in range(rounds):
                shift = round_index % len(order)
                for name in order[shift:] + order[:shift]:
                    wall_n, cpu_n = timed_run(pipelines[name](single, outputs[name]))
                    wall_2n, cpu_2n = timed_run(pipelines[name](double, outputs[name]))
                    steady = wall_2n - wall_n
                    timings[name].wall.append(steady)
                    timings[name].startup.append(wall_n - steady)
                    timings[name].cpu.append((cpu_2n - cpu_n) / count)
                # Each round's own figures as it ends: a run stopped early still leaves numbers.
                speeds = {name: count / t.wall[-1] for name, t in timings.items()}
                line = ", ".join(f"{name} {speed:.3f} img/s" for name, speed in speeds.items())
                if "segcli" in speeds:
                    line += f"; segcli x plain {speeds['segcli'] / speeds['plain']:.2f}, x tuned {speeds['segcli'] / speeds['tuned']:.2f}"
                print(f"  {arch} round {round_index + 1}/{rounds} ({load_line()}): {line}", flush=True)
            results = {name: load_detections(outputs[name], names_2n) for name in pipelines}
            for name in pipelines:
                timings[name].detections = sum(len(r[1]) for r in results[name].values()) / len(names_2n)
            print_arch_table(arch, count, rounds, timings)
            if "segcli-fp32" in results:
                matched, total = parity(results["plain"], results["segcli-fp32"])
                print(f"  segcli-fp32 vs plain (parity contract: label, box 0.5 px, score 1e-3, mask IoU 0.98): "
                      f"{matched}/{total} detections match ({matched / max(total, 1):.1%})")
            if profile:
                per_image, total_ms, images, precision = profile_predict([str(single)], str(checkpoint), tmp)
                print(f"\n  segcli stage profile ({arch}, {precision}, in-process run_predict over the {images} photos "
                      f"after one untimed pass; wall ms per image):")
                print("\n".join(format_profile(per_image, total_ms)))
            print(flush=True)
    print(f"end:     {load_line()}")


def print_arch_table(arch: str, count: int, rounds: int, timings: dict[str, Timing]) -> None:
    print(f"{arch}: {count} photos, time(2N) - time(N), median of {rounds} rounds")
    references = [name for name in ("plain", "tuned", "baseline") if name in timings]
    print(f"  {'pipeline':12} {'img/s':>7} {'start-up s':>10} {'CPU s/img':>9} {'dets/img':>8}"
          + "".join(f" {'x ' + ref:>10}" for ref in references))
    for name, timing in timings.items():
        speed = count / statistics.median(timing.wall)
        ratios = [statistics.median([r / t for r, t in zip(timings[ref].wall, timing.wall)]) for ref in references]
        print(f"  {name:12} {speed:>7.3f} {statistics.median(timing.startup):>10.1f} {statistics.median(timing.cpu):>9.2f} "
              f"{timing.detections:>8.1f}" + "".join(f" {ratio:>10.2f}" for ratio in ratios))
