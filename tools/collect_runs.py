"""Copy the results of a sweep folder into a folder small enough to commit, and export chosen models with a checksum.

A sweep folder (`dlatent sweep ... --out SRC`) holds, per point, config.json, metrics.json, history.csv and the
checkpoints. This script copies sweep.json and, for each finished point (one with metrics.json), its config.json,
metrics.json and history.csv into DST, leaving the checkpoints out, so that `dlatent.experiments.sweep.load_sweep(DST)`
reads the same results table as `load_sweep(SRC)`. Points still pending or running are listed in DST's sweep.json and
copied on a later call, once they have finished.

With `--export POINT ...` it also writes, for each named point, the directory `dlatent export` makes (config.json,
model.safetensors, README.md, and checksum.json with the SHA-256 of the weights: `export_run` in
dlatent.experiments.export) into DST/models/POINT; `load_exported(DIR)` verifies the weights and loads the model.
`--drop PREFIX` leaves out the tensors whose names start with PREFIX (e.g. FactorVAE's `discriminator.`, 20 MB that
neither the representation nor the decoder uses); checksum.json lists what was left out, and `load_exported` checks that
exactly those are missing.

    python tools/collect_runs.py runs/vae-table1 nbs/tutorials/vae_table1/vae --export 'train.seed=0_model.name=vae'
    python tools/collect_runs.py runs/factorvae-table1 nbs/tutorials/vae_table1/factorvae --export train.seed=0 --drop discriminator.
"""
import argparse, json, shutil, sys
from pathlib import Path

from dlatent.experiments.export import export_run
from dlatent.experiments.sweep import read_metrics      # a point has finished when this reads its metrics (load_sweep's 'done')

RUN_FILES = ('config.json', 'metrics.json', 'history.csv')

def copy_results(src: Path, dst: Path) -> dict:
    "Copy sweep.json and the small files of each finished point from `src` to `dst`; returns {point: 'copied' | status}."
    manifest = json.loads((src / 'sweep.json').read_text())
    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, p in manifest['points'].items():
        if read_metrics(src / name) is None:
            out[name] = p.get('status', 'pending'); continue
        (dst / name).mkdir(exist_ok=True)
        for f in RUN_FILES:
            if (src / name / f).is_file(): shutil.copy2(src / name / f, dst / name / f)
        out[name] = 'copied'
    shutil.copy2(src / 'sweep.json', dst / 'sweep.json')       # last: the copied points are there when a reader sees it
    return out

def export_point(src: Path, dst: Path, point: str, drop=(), max_mb: float = 2.0) -> Path | None:
    """`dlatent export` of the run SRC/POINT into DST/models/POINT (with checksum.json), without the tensors named by `drop`;
    None (with a warning) when the run has not finished yet."""
    run_dir = src / point
    if read_metrics(run_dir) is None:
        print(f"warning: --export {point}: {run_dir} has not finished (no metrics.json); not exported, run this again once it has",
              file=sys.stderr)
        return None
    out = dst / 'models' / point
    if out.exists(): shutil.rmtree(out)
    export_run(run_dir, out, drop=drop)
    weights = out / 'model.safetensors'
    weights.chmod(0o644)
    size = weights.stat().st_size
    if size > max_mb * 2**20:
        print(f"warning: {weights} is {size / 2**20:.1f} MiB, more than --max-mb {max_mb}; leave out what is not needed with --drop",
              file=sys.stderr)
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('src', type=Path, help='the sweep folder (with sweep.json)')
    p.add_argument('dst', type=Path, help='the folder to write (created if missing)')
    p.add_argument('--export', nargs='+', default=[], metavar='POINT', help='points whose model to export into DST/models/POINT')
    p.add_argument('--drop', nargs='+', default=[], metavar='PREFIX', help='leave these tensors out of the exported weights')
    p.add_argument('--max-mb', type=float, default=2.0, help='warn when exported weights are larger than this (MiB)')
    a = p.parse_args(argv)
    if not (a.src / 'sweep.json').is_file(): sys.exit(f"{a.src} is not a sweep folder: it has no sweep.json")
    if a.dst.resolve() == a.src.resolve(): sys.exit("DST must differ from SRC")
    status = copy_results(a.src, a.dst)
    copied = [k for k, v in status.items() if v == 'copied']
    rest = {k: v for k, v in status.items() if v != 'copied'}
    print(f"{a.src} -> {a.dst}: {len(copied)} of {len(status)} points finished and copied"
          + (f"; not yet: {', '.join(f'{k} ({v})' for k, v in rest.items())}" if rest else ''))
    for point in a.export:
        if point not in status: sys.exit(f"--export {point}: not a point of {a.src}; its points are {', '.join(status)}")
        out = export_point(a.src, a.dst, point, a.drop, a.max_mb)
        if out is None: continue
        info = json.loads((out / 'checksum.json').read_text())
        print(f"exported {point} to {out}: model.safetensors {info['bytes'] / 2**20:.2f} MiB, sha256 {info['sha256'][:16]}..."
              + (f", {len(info['dropped_tensors'])} tensors left out" if info['dropped_tensors'] else ''))
    total = sum(f.stat().st_size for f in a.dst.rglob('*') if f.is_file())
    print(f"{a.dst}: {total / 2**20:.2f} MiB in all")

if __name__ == '__main__': main()
