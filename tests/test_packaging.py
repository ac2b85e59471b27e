"The library installs and imports with its runtime requirements alone; metadata comes from settings.ini."
import ast, configparser, re
from pathlib import Path
import dlatent

ROOT = Path(__file__).resolve().parent.parent
DEV_ONLY = {'fastcore', 'nbdev', 'execnb', 'IPython', 'pytest'}

def test_modules_import_no_dev_tools():
    "`import dlatent.*` must work without the dev extra: no module imports nbdev, fastcore, IPython or pytest."
    for f in sorted((ROOT / 'dlatent').glob('*.py')):
        if f.name == '_modidx.py': continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ''] if isinstance(node, ast.ImportFrom) else []
            for n in names: assert n.split('.')[0] not in DEV_ONLY, f'{f.name} imports {n}, a development tool'

def test_version_and_requirements_from_settings():
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini')
    assert dlatent.__version__ == cfg['DEFAULT']['version']
    reqs = {re.split(r'[<>=!~ ]', r)[0] for r in cfg['DEFAULT']['requirements'].split()}
    assert {'torch', 'torchvision', 'numpy', 'matplotlib', 'tqdm', 'scikit-learn', 'scipy', 'torchmetrics'} <= reqs
    assert not reqs & DEV_ONLY
