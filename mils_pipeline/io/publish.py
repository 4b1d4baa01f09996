"""Publishing a finished dataset to the Hugging Face hub (optional).

The token comes from the environment ($HF_TOKEN) and is never logged or written anywhere.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec

from mils_pipeline.errors import PublishError
from mils_pipeline.io.sink import join_url
from mils_pipeline.settings import settings

PUBLISHED = ("README.md", "score_histogram.png", "data/*.parquet")  # the card, its image, the data


def _stage(output: str, directory: Path) -> Path:
    """A local folder holding the card and data parts (the output itself when it is local)."""
    fs, root = fsspec.core.url_to_fs(output)
    if "file" in fs.protocol or "local" in fs.protocol:
        return Path(root)
    (directory / "data").mkdir(parents=True)
    fs.get(join_url(root, "README.md"), str(directory / "README.md"))
    if fs.exists(join_url(root, "score_histogram.png")):
        fs.get(join_url(root, "score_histogram.png"), str(directory / "score_histogram.png"))
    for path in fs.glob(join_url(root, "data", "*.parquet")):
        fs.get(path, str(directory / "data" / Path(path).name))
    return directory


def push_to_hub(output: str, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload the card and the data parts of ``output`` to a hub dataset repo; returns its URL."""
    from_env = settings().hf_token
    token = token or (from_env.get_secret_value() if from_env else None)
    if not token:
        raise PublishError(f"publish.hub_repo is {repo_id!r} but no token is set: export HF_TOKEN=<a write token>")
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise PublishError("pushing to the hub needs huggingface_hub: pip install 'mils-pipeline[hub]'") from exc
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _stage(output, Path(tmp))
        try:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=str(folder),
                allow_patterns=list(PUBLISHED),
                commit_message="mils-pipeline: publish captions",
            )
        except Exception as exc:  # noqa: BLE001  (the hub client raises many types; all mean "not published")
            message = str(exc).replace(token, "***")
            raise PublishError(
                f"pushing {output} to hub dataset {repo_id!r} failed: {type(exc).__name__}: {message}"
            ) from None
    return str(getattr(commit, "commit_url", f"https://huggingface.co/datasets/{repo_id}"))
