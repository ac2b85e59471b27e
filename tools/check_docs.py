"""Check what can be checked of the docs build without Quarto.

Runs nbdev's notebook processing for Quarto (`proc_nbs`, the step `nbdev_proc_nbs` and `nbdev_docs` run
before calling Quarto) into `_proc/`, and checks that the sidebar lists every notebook exactly once and
that the Quarto configuration the build reads is the root `_quarto.yml`.
"""
import sys
from pathlib import Path
import yaml
from nbdev.config import get_config
from nbdev.quarto import refresh_quarto_yml
from nbdev.serve import proc_nbs

def main():
    cfg = get_config()
    nbs = cfg.nbs_path
    qy = nbs / '_quarto.yml'
    if not (qy.is_symlink() and qy.resolve() == (cfg.config_path / '_quarto.yml').resolve()):
        sys.exit(f"{qy} must be a link to the root _quarto.yml, the one configuration of the docs")
    refresh_quarto_yml()
    cache = proc_nbs(force=True, n_workers=0)
    notebooks = sorted(str(p.relative_to(nbs)) for p in nbs.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
    missing = [n for n in notebooks if not (cache / n).exists()]
    if missing: sys.exit(f"proc_nbs did not process: {missing}")
    side = yaml.safe_load((nbs / 'sidebar.yml').read_text())
    listed = []
    def walk(items):
        for it in items:
            if isinstance(it, str): listed.append(it)
            elif isinstance(it, dict): walk(it.get('contents', []))
    walk(side['website']['sidebar']['contents'])
    if sorted(listed) != notebooks:
        sys.exit(f"nbs/sidebar.yml and the notebooks differ: not listed {sorted(set(notebooks) - set(listed))}, "
                 f"listed but missing {sorted(set(listed) - set(notebooks))}")
    print(f"docs: {len(notebooks)} notebooks processed into {cache}; sidebar complete")

if __name__ == '__main__': main()
