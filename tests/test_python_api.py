"""The README's "Use from Python" block runs as written against a tiny trained model."""
import re

import pytest
import torch

from config import GSASRecError
from tests.conftest import REPO, tiny_config
from utils import build_model, model_checkpoint, atomic_save, load_model, recommend, recommend_batch


@pytest.fixture
def tiny_checkpoint(tmp_path, synthetic_datasets_dir):
    torch.manual_seed(0)
    config = tiny_config()
    path = tmp_path / "tiny.pt"
    atomic_save(model_checkpoint(build_model(config, 40), config), path)
    (synthetic_datasets_dir / "successor" / "items.tsv").write_text(
        "item_id\ttitle\n" + "".join(f"{item}\tMovie {item}\n" for item in range(1, 41)))
    return path


def test_readme_python_block_runs(tiny_checkpoint, capsys):
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Use from Python.*?```python\n(.*?)```", readme, re.S).group(1)
    code, replaced = re.subn(r'CHECKPOINT = ".*"', f"CHECKPOINT = {str(tiny_checkpoint)!r}", block)
    assert replaced == 1
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all("Movie" in line for line in lines)
    assert [len(recommendations) for recommendations in namespace["many"]] == [3, 3]


def test_recommend_excludes_history_and_matches_the_batched_form(tiny_checkpoint):
    model, _ = load_model(str(tiny_checkpoint), device="cpu")
    history = [5, 6, 7, 8]
    alone = recommend(model, history, k=40)
    assert len(alone) == 36 and not {item for item, _ in alone} & set(history)
    scores = [score for _, score in alone]
    assert scores == sorted(scores, reverse=True)
    batched = recommend_batch(model, [[1, 2], history], k=40)[1]
    assert [item for item, _ in batched] == [item for item, _ in alone]
    assert {item for item, _ in recommend(model, history, k=40, exclude_seen=False)} >= set(history)
    with pytest.raises(GSASRecError, match="1..40"):
        recommend(model, [0, 3])
